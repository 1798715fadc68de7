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


def decode_steps(model, seed: int) -> torch.Tensor:
    """Logits of a 20-token prefill's continuation: six one-token decode steps, then one 4-token
    (verify-sized) step, on a fresh cache. [1, 10, vocab]."""
    ids = torch.randint(0, 1000, (1, 30), generator=torch.Generator().manual_seed(seed))
    cache = model.new_cache(64)
    model(ids[:, :20], cache)
    steps = [model(ids[:, i : i + 1], cache).logits for i in range(20, 26)]
    steps.append(model(ids[:, 26:30], cache, all_logits=True).logits)
    return torch.cat(steps, dim=1)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and a loaded machine makes two threads' syncs slow)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def decode_logits():
    return decode_steps
