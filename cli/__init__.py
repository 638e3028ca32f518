"""The `fvgpt-cache` command line (`main.app`)."""
import os

# Before torch loads OpenMP: threads that spin while they wait stall every parallel region when another
# process holds a core (a 64-configuration grid took 59–146 s instead of 14–16 s on two busy cores,
# measured); waiting passively costs little for the large operations that run on several threads
# (small training groups use one thread anyway). A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
