import pytest
import torch

from mimo_local.dev.tiny import make_checkpoint

torch.manual_seed(0)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny hub-layout checkpoints, made once per test session: checkpoints(preset, fp8=False, shards=2)."""
    made = {}

    def get(preset: str, fp8: bool = False, shards: int = 2):
        key = (preset, fp8, shards)
        if key not in made:
            directory = tmp_path_factory.mktemp("ckpt") / f"{preset}-{'fp8' if fp8 else 'bf16'}-{shards}"
            made[key] = make_checkpoint(directory, preset, fp8=fp8, shards=shards)
        return made[key]

    return get


@pytest.fixture(scope="session")
def scripted_chat(tmp_path_factory):
    """A tiny chat checkpoint that always thinks THINKING and answers ANSWER (mimo_local/dev/scripted_chat.py)."""
    from mimo_local.dev.scripted_chat import make_scripted_chat_checkpoint

    return make_scripted_chat_checkpoint(tmp_path_factory.mktemp("chat") / "scripted")
