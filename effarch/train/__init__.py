"""Training: config, optimiser, sharded jitted step, checkpoints, metrics.

    from effarch import train
    config = train.TrainConfig(steps=600, batch_size=16, seq_len=256)
    trainer = train.Trainer.create(model=lm, model_config=lm_config, config=config,
                                   train_data=ds, eval_data=held_out, workdir="runs/x")
    records = trainer.run()      # resumes from the newest checkpoint in workdir
    saved = train.load_run("runs/x")   # model_config, train_config, params, step: for inference
"""

from effarch.train.checkpoint import Checkpoints, SavedRun, check_or_write_config, load_run
from effarch.train.config import MESH_AXES, TrainConfig
from effarch.train.loop import Trainer, TrainState, count_params, cross_entropy, make_eval_step, make_train_step
from effarch.train.metrics import MetricsWriter, bits_per_byte, read_jsonl
from effarch.train.optim import decay_mask, learning_rate, make_optimizer
from effarch.train.sharding import LOGICAL_RULES, make_mesh, param_specs, parse_mesh

__all__ = [
    "Checkpoints", "LOGICAL_RULES", "MESH_AXES", "MetricsWriter", "SavedRun", "TrainConfig", "TrainState",
    "Trainer", "bits_per_byte", "check_or_write_config", "count_params", "cross_entropy", "decay_mask",
    "learning_rate", "load_run", "make_eval_step", "make_mesh", "make_optimizer", "make_train_step", "param_specs",
    "parse_mesh", "read_jsonl",
]
