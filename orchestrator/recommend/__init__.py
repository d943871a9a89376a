"""Recommend: what a GPU can run and how fast (rank.py), this machine's measured efficiency from
saved bench runs (calibrate.py), and GPUs side by side for one model (compare.py). Pure: it plans
with the planner and predicts with plan.speed; the CLI gathers the facts (GPU, host bandwidth and
FLOPS, saved results) and passes them in."""
