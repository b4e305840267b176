"""Ray launch, fault recovery and sweeps (installed as ``defocus_scale.orchestration``).

Ray code here only launches, watches and restarts the plain torch.distributed trainer.
"""
