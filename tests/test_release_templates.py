"""Chat templates per MiMo version: the prompt `mimo run`, `mimo chat` and `mimo serve` send, with
thinking on, off or at the template's default, with and without tools (mimo_local/thinking.py;
the templates and their sources: mimo_local/dev/templates/README.md)."""

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from mimo_local.chat.session import ChatSession
from mimo_local.chat.settings import ChatSettings
from mimo_local.cli import app
from mimo_local.dev.scripted_chat import chat_template
from mimo_local.dev.tiny import make_checkpoint
from mimo_local.dev.tokenizer_files import train_tokenizer, write_tokenizer_files
from mimo_local.serve.prompts import build_chat_prompt
from mimo_local.thinking import EMPTY_THINKING
from mimo_local.tokenizer import ChatTokenizer

SYSTEM = "<|im_start|>system\nYou are MiMo, a helpful AI assistant engineered by Xiaomi."
TURN = "<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
# the template's default for enable_thinking, per version (README.md there cites the sources)
DEFAULT_THINKING = {"mimo_v2_flash": False, "mimo_v2.5": True, "mimo_v2.6": True}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Each version's tokenizer files: the V2.5 / V2.6 tiny presets as `mimo dev make-tiny` writes them,
    and a V2-Flash one with the V2-Flash template; plus a ChatML one (MiMo-7B presets)."""
    root = tmp_path_factory.mktemp("templates")
    made = {preset: ChatTokenizer(make_checkpoint(root / preset, preset)) for preset in ("mimo_v2.5", "mimo_v2.6")}
    for name, template in (("mimo_v2_flash", chat_template("mimo-v2-flash")), ("chatml", None)):
        (root / name).mkdir()
        write_tokenizer_files(root / name, train_tokenizer(512), *([template] if template else []))
        made[name] = ChatTokenizer(root / name)
    return made


def engine_for(tokenizer, family="mimo_v2_flash"):
    """What ChatSession and the server read from an engine, around a real tokenizer."""
    return SimpleNamespace(tokenizer=tokenizer, config=SimpleNamespace(max_position_embeddings=4096, family=family),
                           speculation=lambda mtp, draft_tokens=0: {"draft_tokens": 0})


@pytest.mark.parametrize("preset", list(DEFAULT_THINKING))
@pytest.mark.parametrize("thinking", [None, True, False])
def test_generation_prompt_per_version(tokenizers, preset, thinking):
    tokenizer = tokenizers[preset]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    on = DEFAULT_THINKING[preset] if thinking is None else thinking
    prompt = tokenizer.render_chat([{"role": "user", "content": "Hi"}], **kwargs)
    # thinking on: the model opens <think> itself (no version ends the prompt with it); off: an empty block
    assert prompt == SYSTEM + TURN + ("" if on else "<think></think>")


@pytest.mark.parametrize("preset", list(DEFAULT_THINKING))
@pytest.mark.parametrize("thinking", [True, False])
def test_tools_are_listed_with_the_xml_call_format(tokenizers, preset, thinking):
    prompt = tokenizers[preset].render_chat([{"role": "user", "content": "Hi"}], tools=TOOLS, enable_thinking=thinking)
    assert prompt.startswith(SYSTEM + "\n\n# Tools\n\n")
    assert "<function>\n<name>get_weather</name>\n<description>Weather of a city.</description>" in prompt
    assert "<parameter>\n<name>city</name>\n<type>string</type>\n</parameter>" in prompt
    assert "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>value_1</parameter>" in prompt
    assert prompt.endswith(TURN + ("" if thinking else "<think></think>"))


@pytest.mark.parametrize("preset", ["mimo_v2.5", "mimo_v2.6"])
def test_past_tool_calls_and_results_render_in_the_xml_form(tokenizers, preset):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "A lookup.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "Sunny"},
    ]
    prompt = tokenizers[preset].render_chat(messages, tools=TOOLS)
    assert prompt.endswith(
        "<|im_start|>assistant\n<think>A lookup.</think><tool_call>\n<function=get_weather>\n"
        "<parameter=city>Paris</parameter>\n</function>\n</tool_call><|im_end|>"
        "<|im_start|>tool\n<tool_response>\nSunny\n</tool_response>\n<|im_end|><|im_start|>assistant\n")


@pytest.mark.parametrize("preset", list(DEFAULT_THINKING) + ["chatml"])
@pytest.mark.parametrize("think", [True, False])
def test_mimo_chat_switches_thinking_through_the_template(tokenizers, preset, think):
    """`mimo chat --think/--no-think`: the template's own switch where it has one (one empty block,
    never two), the empty block after a ChatML template."""
    session = ChatSession(engine_for(tokenizers[preset]), preset, ChatSettings(think=think), mtp=False)
    text, appended = session.prompt_text([{"role": "user", "content": "Hi"}])
    if preset == "chatml":
        assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" + ("" if think else EMPTY_THINKING)
        assert appended == ("" if think else EMPTY_THINKING)
    else:
        assert text == SYSTEM + TURN + ("" if think else "<think></think>")
        assert appended == ""
    assert text.count("</think>") == (0 if think else 1)
    assert not session.thinking_opened_by_prompt()


@pytest.mark.parametrize("preset", list(DEFAULT_THINKING))
@pytest.mark.parametrize("thinking", [None, True, False])
def test_server_prompt_follows_the_version(tokenizers, preset, thinking):
    prompt = build_chat_prompt(engine_for(tokenizers[preset]), [{"role": "user", "content": "Hi"}], TOOLS, thinking)
    on = DEFAULT_THINKING[preset] if thinking is None else thinking
    assert prompt.text.endswith(TURN + ("" if on else "<think></think>"))
    assert prompt.tool_format == "xml" and not prompt.in_reasoning
    assert prompt.ids == tokenizers[preset].encode(prompt.text)


@pytest.mark.parametrize("flag, thinking", [([], None), (["--think"], True), (["--no-think"], False)])
def test_mimo_run_sends_the_versions_prompt(tmp_path, tokenizers, flag, thinking):
    """`mimo run` on a tiny V2.6 checkpoint: the prompt it feeds is the template's, thinking as asked
    (default: on for V2.6), counted in its --json statistics."""
    model = make_checkpoint(tmp_path / "v26", "mimo_v2.6")
    result = CliRunner().invoke(app, ["run", "-m", str(model), "--temperature", "0", "-n", "2", "--json",
                                      "--no-mtp", *flag, "Hi"])
    assert result.exit_code == 0, result.output
    on = True if thinking is None else thinking
    expected = SYSTEM + TURN + ("" if on else "<think></think>")
    assert json.loads(result.stdout)["prompt_tokens"] == len(tokenizers["mimo_v2.6"].encode(expected))


def test_mimo_run_refuses_think_with_raw(tmp_path):
    result = CliRunner().invoke(app, ["run", "-m", str(tmp_path), "--raw", "--no-think", "Hi"])
    assert result.exit_code == 1
    assert "--think/--no-think cannot go with it" in result.output
