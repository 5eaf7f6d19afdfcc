#!/usr/bin/env bash
# require-space.sh GIB WHAT: fails with a message naming WHAT when the project's file system has less than GIB GiB
# free, before pip fails halfway with "No space left on device" (a half-installed venv is then reused by the next
# run). Sourced by the set-up scripts before their large installs.
require_space() {
  local need_gib="$1" what="$2" free_kib
  free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
  if [ -n "$free_kib" ] && [ "$free_kib" -lt $((need_gib * 1024 * 1024)) ]; then
    echo "ff-kernels setup: $what needs about $need_gib GiB free under $(pwd); $((free_kib / 1024)) MiB are" \
      "free (df -h .). Free some space (old virtual environments, /tmp) and run again." >&2
    exit 1
  fi
}
