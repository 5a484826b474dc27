#!/bin/sh
# plot-loss.sh: the loss curve of a lora-train run, as SVG or PNG.
#
#   sh examples/plot-loss.sh metrics.jsonl loss.svg     (or loss.png)
#
# metrics.jsonl is what lora-train writes on stdout: one JSON object a line;
# lines with "loss" give the training curve and lines with "eval_loss" the
# evaluation points, both against "step". The format follows the output
# name's extension. Needs jq and gnuplot (apt-get install gnuplot-nox).
# The same in one command line, without this script:
#
#   jq -r 'select(.loss) | "\(.step) \(.loss)"' metrics.jsonl |
#       gnuplot -e "set terminal svg; set output 'loss.svg';
#                   set xlabel 'step'; set ylabel 'loss';
#                   plot '-' with lines title 'training loss'"
set -eu
if [ $# -ne 2 ]; then
    echo "usage: sh examples/plot-loss.sh metrics.jsonl output.svg|output.png" >&2
    exit 2
fi
in=$1 out=$2
for tool in jq gnuplot; do
    command -v $tool >/dev/null 2>&1 || {
        echo "plot-loss: $tool is not installed" >&2
        exit 2
    }
done
case $out in
*.svg) term="svg size 800,480 dynamic background rgb 'white'" ;;
*.png) term="pngcairo size 800,480" ;;
*) echo "plot-loss: '$out': the name must end in .svg or .png" >&2; exit 2 ;;
esac
[ -r "$in" ] || { echo "plot-loss: cannot read '$in'" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
jq -r 'select(.loss != null) | "\(.step) \(.loss)"' "$in" >"$tmp/train"
jq -r 'select(.eval_loss != null) | "\(.step) \(.eval_loss)"' "$in" >"$tmp/eval"
[ -s "$tmp/train" ] || { echo "plot-loss: no \"loss\" in '$in'" >&2; exit 2; }
plot="'$tmp/train' using 1:2 with lines linewidth 2 title 'training loss'"
[ -s "$tmp/eval" ] &&
    plot="$plot, '$tmp/eval' using 1:2 with linespoints linewidth 2 title 'eval loss'"
gnuplot <<EOF
set terminal $term
set output '$tmp/plot'
set xlabel 'step'
set ylabel 'loss (cross-entropy, nats per token)'
set grid
set key top right
plot $plot
EOF
mv "$tmp/plot" "$out"
