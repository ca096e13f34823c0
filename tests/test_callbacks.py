"""NonFiniteLossCallback: training stops at the first NaN/infinite step, before the weights or a checkpoint get it."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, TrainerControl, TrainerState, TrainingArguments

from optical_hf import NonFiniteLossCallback, NonFiniteLossError, OTDistillationTrainer


def test_trainer_stops_before_the_optimizer_step_that_would_write_nan(model_dirs, bitext, tmp_path,
                                                                       nan_loss_from_step):
    nan_loss_from_step(3)
    out = tmp_path / "run"
    trainer = OTDistillationTrainer(
        model=AutoModel.from_pretrained(model_dirs["student"]),
        teacher=AutoModel.from_pretrained(model_dirs["teacher"]),
        teacher_processing_class=AutoTokenizer.from_pretrained(model_dirs["teacher"]),
        args=TrainingArguments(str(out), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3,
                               save_strategy="steps", save_steps=1, report_to=[], seed=0,
                               dataloader_pin_memory=False),
        train_dataset=bitext,
    )
    assert any(isinstance(callback, NonFiniteLossCallback) for callback in trainer.callback_handler.callbacks)
    with pytest.raises(NonFiniteLossError, match=r"training step 3: the gradient norm is nan"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(param).all() for param in trainer.model.parameters())
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    saved = load_file(out / "checkpoint-2" / "model.safetensors")  # the last checkpoint is the current, finite model
    assert saved.keys() == trainer.model.state_dict().keys()
    assert all(torch.equal(saved[name], param) for name, param in trainer.model.state_dict().items())


@pytest.mark.parametrize("key, value", [("loss", math.nan), ("grad_norm", math.inf)])
def test_a_logged_non_finite_value_stops_training(key, value, tmp_path):
    callback, state = NonFiniteLossCallback(), TrainerState(global_step=7)
    args, control = TrainingArguments(str(tmp_path), report_to=[]), TrainerControl()
    callback.on_log(args, state, control, logs={"loss": 0.5, "grad_norm": 1.0, "learning_rate": 1e-4})
    with pytest.raises(NonFiniteLossError, match=rf"training step 7: the logged {key} is {value}"):
        callback.on_log(args, state, control, logs={"loss": 0.5, "grad_norm": 1.0, key: value})
