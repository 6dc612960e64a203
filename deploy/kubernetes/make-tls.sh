#!/usr/bin/env bash
# The managers' HTTPS certificates: one CA, and for every node a certificate for its
# address (and 127.0.0.1, where the node plugin beside it calls), signed by the CA.
# The node plugin and the controller trust the CA only (--manager-ca).
#
# Usage: deploy/kubernetes/make-tls.sh OUTDIR NODE=IP [NODE=IP ...]
#   NODE is the Kubernetes node name (the manager picks NODE.crt by $(NODE_NAME)),
#   IP the node's address (status.hostIP, the controller's --manager URL).
# Then:
#   kubectl -n longhorn-system create secret generic longhorn-manager-tls \
#     --from-file=OUTDIR/ca.crt --from-file=OUTDIR/NODE.crt --from-file=OUTDIR/NODE.key ...
# (the command is printed at the end). Keep OUTDIR/ca.key off the cluster: it is only
# needed to add nodes later (run this again with the same OUTDIR: the CA is kept).
#
# validate: makes Secret longhorn-system/longhorn-manager-tls keys ca.crt
set -euo pipefail
if (($# < 2)); then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
shift
mkdir -p "$out"
cd "$out"
umask 077
if [ ! -f ca.key ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -days 3650 \
        -subj "/CN=longhorn manager CA" -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
fi
files=(--from-file=ca.crt)
for arg in "$@"; do
    node=${arg%%=*}
    ip=${arg#*=}
    if [[ -z $node || $node == "$arg" || ! $node =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ ]]; then
        echo "make-tls.sh: $arg: expected NODE=IP with NODE a node name" >&2
        exit 2
    fi
    if ! [[ $ip =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || $ip == *:* ]]; then
        echo "make-tls.sh: $arg: $ip is not an IP address" >&2
        exit 2
    fi
    printf 'subjectAltName=IP:%s,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' "$ip" > "$node.ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$node.key" -out "$node.csr" \
        -subj "/CN=$node" 2>/dev/null
    openssl x509 -req -in "$node.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$node.crt" -days 825 \
        -extfile "$node.ext" 2>/dev/null
    rm -f "$node.csr" "$node.ext"
    files+=("--from-file=$node.crt" "--from-file=$node.key")
done
echo "kubectl -n longhorn-system create secret generic longhorn-manager-tls \\"
echo "  ${files[*]/#/}" | sed "s#--from-file=#--from-file=$PWD/#g"
