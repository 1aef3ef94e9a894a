"""What workers share through Redis, so that many exports and prunes run at once safely."""
