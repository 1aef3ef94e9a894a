"""Tests of the deployment files: Dockerfile, docker-compose.yml and the Helm chart."""
