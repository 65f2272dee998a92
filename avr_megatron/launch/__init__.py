"""Launching `avr` work on clusters: the NeMo-Run Slurm executor of `avr pipeline` (slurm.py)
and the shared shell fragment that sets up multi-node rendezvous from Slurm variables
(rendezvous.py). The plain sbatch scripts live in slurm/ at the repository root."""
