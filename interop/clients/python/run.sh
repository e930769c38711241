#!/usr/bin/env bash
# Entry point of the Python interop client (the runner's client command). Needs setup.sh first.
here="$(cd "$(dirname "$0")" && pwd)"
if [ ! -x "$here/.venv/bin/python" ]; then
    echo "python client: $here/.venv missing; run $here/setup.sh" >&2
    exit 1
fi
# The requirement checks of PROTOCOL.md §10 are their own program.
if [ "${TESTCASE:-}" = conformance ]; then
    exec "$here/.venv/bin/python" "$here/conformance.py" "$@"
fi
exec "$here/.venv/bin/python" "$here/client.py" "$@"
