# Plots bench/results/p50.dat written by bench/bench.py. Called as
#   gnuplot -e "datafile='.../p50.dat'; outdir='.../results'; term='pngcairo'" bench/plot.gp
# Columns: 1 size in MiB; 2-5 blackout p50 (ms) and 6-9 total p50 (ms) for
# cprd handover, cprd cpr-transfer, QEMU migration with RAM copy, QEMU
# cpr-transfer driven directly; 10 new-QEMU start-up p50 (ms). '?' = no data.

if (!exists("term")) term = "pngcairo"
if (term eq "pngcairo") {
    set terminal pngcairo size 900,560 enhanced font "sans,10"
} else {
    set terminal png size 900,560
}
set datafile missing "?"
set key top left box opaque
set grid xtics ytics mytics
set logscale x 2
set format x "%g"
set xlabel "guest memory (MiB, log scale)"
set style data linespoints

set output outdir."/blackout.png"
set title "Live-update blackout, p50 (RESUME on new QEMU - STOP on old)"
set ylabel "blackout p50 (ms, log scale)"
set logscale y
plot datafile using 1:2 title "cprd handover" lw 2 pt 7, \
     ''       using 1:3 title "cprd cpr-transfer" lw 2 pt 5, \
     ''       using 1:4 title "QEMU migration, RAM copied" lw 2 pt 9, \
     ''       using 1:5 title "QEMU cpr-transfer (direct)" lw 2 pt 11

set output outdir."/total.png"
set title "Total update time, p50"
set ylabel "total p50 (ms, log scale)"
set logscale y
plot datafile using 1:6 title "cprd handover" lw 2 pt 7, \
     ''       using 1:7 title "cprd cpr-transfer" lw 2 pt 5, \
     ''       using 1:8 title "QEMU migration, RAM copied" lw 2 pt 9, \
     ''       using 1:9 title "QEMU cpr-transfer (direct, from migrate)" lw 2 pt 11, \
     ''       using 1:10 title "new QEMU start-up" lw 2 dt 2 pt 1
