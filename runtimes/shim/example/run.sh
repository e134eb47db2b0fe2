# The example function behind ember-shim, run once per request by busybox's sh.
# The body is on stdin, the request in EMBER_* variables, and stdout is the answer.
# `?sleep=N` sleeps N seconds first (a stand-in for a long render); `?fail` exits 3.
bytes=$(wc -c)
query="&$EMBER_QUERY&"
case "$query" in
*"&fail&"*)
    echo "asked to fail (query: $EMBER_QUERY)" >&2
    exit 3
    ;;
esac
seconds=$(echo "$query" | sed -n 's/.*&sleep=\([0-9.]*\)&.*/\1/p')
if [ -n "$seconds" ]; then
    sleep "$seconds"
fi
echo "bytes=$bytes"
echo "method=$EMBER_METHOD path=$EMBER_PATH query=$EMBER_QUERY"
echo "scene=${EMBER_HEADER_X_SCENE:-none}"
