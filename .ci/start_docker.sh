#!/usr/bin/env bash
# Make a Docker daemon available for tests/test_docker.py: install docker.io, docker-compose and debootstrap
# (for a base image without a registry) if missing, and start dockerd if none answers. Exit non-zero with the
# reason where that is impossible; the cluster test then skips and prints why.
set -uo pipefail
if ! command -v dockerd > /dev/null || ! command -v docker-compose > /dev/null || ! command -v debootstrap > /dev/null; then
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose \
            debootstrap; } > /tmp/ci-apt.log 2>&1; then
        tail -n 5 /tmp/ci-apt.log
        echo "start_docker: apt-get could not install docker.io docker-compose debootstrap"
        exit 1
    fi
fi
if docker info > /dev/null 2>&1; then
    exit 0
fi
nohup dockerd > /tmp/ci-dockerd.log 2>&1 &
for _ in $(seq 60); do
    docker info > /dev/null 2>&1 && exit 0
    sleep 0.5
done
tail -n 5 /tmp/ci-dockerd.log
echo "start_docker: dockerd did not answer within 30 s"
exit 1
