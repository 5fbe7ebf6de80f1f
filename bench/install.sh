#!/bin/sh
# One-time setup for `python -m bench` on Debian (run as root from the repository root).
#
# System peers come from Debian: the Go toolchain and quic-go *source* for an
# offline GOPATH build of bench/goquic (no Go module proxy is used), OpenSSH
# for `ssh -L`, stunnel4, iperf3 and socat. Python extras (matplotlib, py-spy,
# qh3, uvloop) come from the project's `bench` optional dependencies.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends \
    golang-go golang-github-lucas-clemente-quic-go-dev \
    openssh-server openssh-client stunnel4 iperf3 socat procps
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m pip install -e '.[dev,bench]'
