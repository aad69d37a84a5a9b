"""Where the compute warpgroups of the Mosaic GPU launch spend their time (run 16, call 1).

Reads Nsight Compute's per-instruction warp-state samples (`ncu -i stall.ncu-rep --page source
--print-source sass --csv`, gzipped as call1/stall_source.csv.gz) and splits each kernel's
compute-warpgroup samples by how often an instruction ran: every compute warp runs a node
step's code once a node step, a suffix step's once a suffix step and the prologue and
epilogue once, so equal execution counts group the code by what it does. The memory
warpgroup's code starts at its `USETMAXREG.DEALLOC` and is left out; the code before the
warpgroups part (instruction 208, `USETMAXREG.TRY_ALLOC` follows) is shared. Samples are
taken at a fixed interval a warp, so a group's share of the samples is its share of the
compute warps' time; times below are that share of the kernel's duration (`stall_details.txt`).

    python3 stall_regions.py call1/stall_source.csv.gz
"""
import collections
import csv
import gzip
import sys

NAMES = ["4K/256 folded", "16K/256 folded", "4K/256 unfolded", "16K/256 unfolded"]
DURATIONS_US = [58.82, 141.63, 32.74, 115.26]   # stall_details.txt, in the same order


def kernels(path):
  rows = list(csv.reader(gzip.open(path, "rt")))
  starts = [i for i, r in enumerate(rows) if r and r[0] == "Kernel Name"] + [len(rows)]
  for a, b in zip(starts, starts[1:]):
    header = rows[a + 1]
    yield {h: i for i, h in enumerate(header)}, rows[a + 2:b]


def main(path):
  for name, dur, (col, body) in zip(NAMES, DURATIONS_US, kernels(path)):
    samples = [int(r[col["Warp Stall Sampling (All Samples)"]]) for r in body]
    count = [int(r[col["Instructions Executed"]]) for r in body]
    text = [r[col["Source"]].strip() for r in body]
    memory = next(i for i, t in enumerate(text) if "USETMAXREG.DEALLOC" in t)
    compute = range(208, memory)
    total = sum(samples[i] for i in compute)
    by_count = collections.Counter()
    for i in compute:
      by_count[count[i]] += samples[i]
    print(f"{name}: {dur} us, {total} compute-warp samples")
    for n, s in by_count.most_common(5):
      print(f"  executed {n:6d} times: {100 * s / total:5.1f}% ~ {dur * s / total:6.1f} us")


if __name__ == "__main__":
  main(sys.argv[1])
