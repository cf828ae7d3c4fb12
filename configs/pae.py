"""PAE — Pack and Expand (Hung et al. 2019): CPG without picking, growth up to 2x parameters.

Every weight of earlier tasks is used (no picking mask); otherwise CPG's accuracy goal, growth,
gradual compaction and release, with the maximum width sqrt(2) channels = 2x parameters and growth
levels 1.0, 1.5, 2.0 (as coded).

Commands:
  python experiments/main.py --config=configs/pae.py --workdir=/tmp/pae
  python experiments/main.py --config=configs/pae.py:runlocal --workdir=/tmp/pae_small
  python experiments/main.py --config=configs/pae.py:fashion_mnist --workdir=/tmp/pae_fmnist
  python experiments/main.py --config=configs/pae.py:cifar100 --workdir=/tmp/pae_c100
Expected runtime: as configs/cpg.py (runlocal: a few seconds).
Expected result: BWT exactly 0, expansion up to 2x (paper, CIFAR-100: 77.1 average, 2x weights).
"""

from sparse_cl_jax import config as config_lib
from sparse_cl_jax.methods import cpg


def _cpg_config_module():
  return config_lib.sibling_module(__file__, "cpg")


def get_config(arg: str | None = None):
  # The shared fields (data, model, optimiser, presets) are CPG's.
  c = _cpg_config_module().get_config(None)
  c.method = "pae"
  c.cpg = cpg.default_config("pae")
  c.cpg.stage_epochs = 2
  c.cpg.ramp_epochs = 1.0
  c.cpg.prune_lr = 0.005
  c.cpg.retrain_epochs = 5
  c.cpg.retrain_patience = 2
  c = _cpg_config_module().apply_preset(c, arg)
  if arg == "runlocal":
    c.cpg.goal = "current_finetune"  # (exercises a reference goal fine-tuned from the network)
  return c
