#!/usr/bin/env bash
# TLS certificates and SuperNode authentication keys for a FedLaDa deployment on Flower (docs/deployment.md).
#
#   scripts/make_certs.sh [OUT_DIR] [NUM_SUPERNODES] [SUPERLINK_HOST ...]
#
# OUT_DIR (default: certificates) receives
#   ca.crt, ca.key            a self-signed certificate authority (keep ca.key offline; ship ca.crt to every machine)
#   server.pem, server.key    the SuperLink's certificate, valid for localhost, 127.0.0.1 and every SUPERLINK_HOST
#                             (a DNS name or an IP address: the address SuperNodes and `flwr` use to reach it)
#   supernode_K, supernode_K.pub   K = 0..NUM_SUPERNODES-1: each SuperNode's EC P-384 key pair in OpenSSH format;
#                             the private key stays on that SuperNode's machine, the .pub is registered with
#                             `flwr supernode register`
# Needs openssl and ssh-keygen. Certificates are valid for 365 days.
set -euo pipefail

out="${1:-certificates}"
num="${2:-3}"
shift $(( $# > 2 ? 2 : $# ))

san="DNS:localhost,IP:127.0.0.1"
for host in "$@"; do
    if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then san="$san,IP:$host"; else san="$san,DNS:$host"; fi
done

mkdir -p "$out"
cd "$out"
openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -new -x509 -key ca.key -sha256 -days 365 -subj "/CN=FedLaDa CA" -out ca.crt
openssl ecparam -name prime256v1 -genkey -noout -out server.key
openssl req -new -key server.key -subj "/CN=fedlada-superlink" -out server.csr
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
    -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key

for ((k = 0; k < num; k++)); do
    rm -f "supernode_$k" "supernode_$k.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedlada-supernode-$k" -f "supernode_$k"
done
echo "wrote $(pwd): ca.crt, server.pem/server.key (SAN $san), supernode_0..$((num - 1)) key pairs"
