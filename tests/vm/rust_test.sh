#!/bin/bash
# Runs one of the suite's own Rust tests inside the test VM (chroot into the host's
# root), for scenarios that need this kernel's drivers from Rust: rust_test.sh
# LONGHORN_BIN TEST_BINARY TEST_NAME MODULE...
# The test prints its own `STEP` lines; this prints `STEP vm.modules` and
# `STEP test.exit OK|FAIL code=N`.
BIN=$1 TBIN=$2 NAME=$3; shift 3
export RUST_LOG=info NO_COLOR=1 RUST_BACKTRACE=1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
cd /tmp
modprobe -d "${LH_MODDIR:-/}" -a "$@" 2>/tmp/modprobe.err \
    && echo "STEP vm.modules OK $*" \
    || { echo "STEP vm.modules FAIL $(tr '\n' ' ' < /tmp/modprobe.err)"; exit 0; }
mkdir -p /tmp/e2e
LONGHORN_BIN=$BIN LONGHORN_TEST_DIR=/tmp/e2e LONGHORN_IN_VM=1 \
    "$TBIN" --exact "$NAME" --ignored --nocapture --test-threads 1 2>&1
rc=$?
[ $rc = 0 ] && echo "STEP test.exit OK code=0" || echo "STEP test.exit FAIL code=$rc"
