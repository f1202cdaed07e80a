# Plots bench/results/checkpoint.dat written by bench/bench_checkpoint.py.
# Called as
#   gnuplot -e "datafile='...'; out='.../checkpoint.png'; term='pngcairo'; n=6; titles='a|b|...'" \
#       bench/plot_checkpoint.gp
# Columns: 1 size in MiB; then n checkpoint times (s), then n restore times (s),
# one per method in the order of titles ('|'-separated). '?' = no data.

if (!exists("term")) term = "pngcairo"
if (term eq "pngcairo") {
    set terminal pngcairo size 1200,520 enhanced font "sans,10"
} else {
    set terminal png size 1200,520
}
set output out
set datafile missing "?"
set key top left box opaque font ",8"
set grid xtics ytics mytics
set logscale x 2
set logscale y
set format x "%g"
set xlabel "guest memory (MiB, log scale)"
set style data linespoints

# the i-th '|'-separated title
title_of(i) = (i == 1) ? titles[1:strstrt(titles, "|") - 1] : \
    title_of_rest(titles[strstrt(titles, "|") + 1:], i - 1)
title_of_rest(t, i) = (i == 1) ? (strstrt(t, "|") ? t[1:strstrt(t, "|") - 1] : t) : \
    title_of_rest(t[strstrt(t, "|") + 1:], i - 1)

set multiplot layout 1,2
set title "Checkpoint (pause to fsynced)"
set ylabel "seconds (log scale)"
plot for [i=1:n] datafile using 1:(column(1 + i)) title title_of(i) lw 2 pt (4 + i)
set title "Restore (cold page cache; spawn to running)"
plot for [i=1:n] datafile using 1:(column(1 + n + i)) title title_of(i) lw 2 pt (4 + i)
unset multiplot
