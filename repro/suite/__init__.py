"""`repro run-all`: the paper's suite of runs, planned from experiments/suite.yaml (plan.py) and run
on this machine (local.py) or as Slurm jobs (slurm.py); run_all.py reads the options and chooses."""
