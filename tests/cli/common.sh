# common.sh: what every tool promises (STYLE.md "A tool's main()"):
# --help to stdout with exit 0, -V, a bad flag gives exit 2 with a message
# and the usage on stderr, and the usage equals the man page's SYNOPSIS.
. "$TOP/tests/cli/lib.sh"

for t in dolly-fmt tok pack nf4-quant lora-train lora-gen lora-merge; do
    if [ ! -x "$TOP/bin/$t" ]; then
        skip "$t: not built yet"
        continue
    fi
    "$t" --help >out 2>err
    if [ $? -eq 0 ] && grep -qi '^usage:' out && [ ! -s err ]; then
        ok "$t --help: usage on stdout, exit 0"
    else
        notok "$t --help"
    fi
    "$t" -V >out 2>err
    if [ $? -eq 0 ] && grep -q "^$t [0-9]" out; then
        ok "$t -V prints the version"
    else
        notok "$t -V"
    fi
    "$t" --no-such-flag >out 2>err </dev/null
    rc=$?
    if [ $rc -eq 2 ] && [ ! -s out ] && head -n 1 err | grep -q "^$t: " &&
        grep -qi 'usage:' err; then
        ok "$t: bad flag exits 2 with a message and the usage"
    else
        notok "$t: bad flag (exit $rc)"
    fi
    # The usage string equals the man page's SYNOPSIS (words compared).
    page="$TOP/man/$t.1"
    if [ -f "$page" ] && command -v mandoc >/dev/null 2>&1; then
        mandoc -Tascii "$page" | col -b |
            awk '/^SYNOPSIS/{f=1;next} /^[A-Z]/{f=0} f' |
            tr -s ' \n\t' '\n' | grep -v '^$' >syn
        "$t" --help | awk 'NR==1 || /^ *'"$t"' /{print} /^$/{exit}' |
            sed 's/^usage: *//I' | tr -s ' \n\t' '\n' | grep -v '^$' >use
        if cmp -s syn use; then
            ok "$t: usage equals the man page SYNOPSIS"
        else
            notok "$t: usage differs from the man page SYNOPSIS"
            diff syn use | head -n 10 | sed 's/^/    /'
        fi
    else
        skip "$t: no man page or no mandoc"
    fi
done
