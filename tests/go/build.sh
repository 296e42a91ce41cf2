#!/bin/sh
# Build the Go client of gptoss.v1 (tests/go/client) offline, from Debian's packages only:
#   apt-get install golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc \
#       golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
# Usage: tests/go/build.sh WORK_DIR      (writes the binary WORK_DIR/bin/gptoss-client)
set -eu
repo=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$1"
work=$(cd "$1" && pwd)

# The stubs land under their go_package import path inside a GOPATH of our own.
mkdir -p "$work/src/gptoss-client" "$work/bin"
protoc -I "$repo/protos" --go_out="$work/src" --go-grpc_out="$work/src" "$repo"/protos/gptoss/v1/*.proto
cp "$repo/tests/go/client/main.go" "$work/src/gptoss-client/"

# GOPATH mode: Debian installs its Go libraries (grpc, protobuf, genproto's errdetails) as source
# under /usr/share/gocode; no module download, no network.
cd "$work/src/gptoss-client"
GO111MODULE=off GOPATH="$work:/usr/share/gocode" GOFLAGS= go build -o "$work/bin/gptoss-client" .
