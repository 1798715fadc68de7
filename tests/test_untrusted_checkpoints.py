"""Hostile checkpoints: malformed configs, safetensors headers, indexes and file types end in a
one-line error (exit code 1 from the real CLI, no traceback) before memory or time is spent;
generated headers and configs (hypothesis) never raise anything but MimoError."""

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from mimo_local import limits
from mimo_local.checkpoint import Checkpoint, read_header
from mimo_local.cli import app
from mimo_local.config import parse_config
from mimo_local.errors import MimoError

runner = CliRunner()


@pytest.fixture
def model(checkpoints, tmp_path):
    """A fresh copy of the tiny sharded MiMo-7B-layout checkpoint to break."""
    target = tmp_path / "model"
    shutil.copytree(checkpoints("mimo", shards=2), target)
    return target


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def write_header(path, header, data: bytes = b"", declared_length=None):
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(encoded) if declared_length is None else declared_length
    path.write_bytes(struct.pack("<Q", length) + encoded + data)


def single_shard(directory, header, data=b"", declared_length=None):
    """Replace the checkpoint by one model.safetensors with this header."""
    for path in directory.glob("model*.safetensors*"):
        path.unlink()
    write_header(directory / "model.safetensors", header, data, declared_length)


def assert_one_line_error(result, *expected):
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for text in expected:
        assert text in lines[0], lines[0]


def show(directory):
    return runner.invoke(app, ["show", str(directory)])


# -- config.json ---------------------------------------------------------------------------------

CONFIG_CASES = [
    ({"num_hidden_layers": 1_000_000}, "'num_hidden_layers' = 1000000 is over the limit of 512"),
    ({"num_attention_heads": 0}, "'num_attention_heads' must be at least 1"),
    ({"hidden_size": "64"}, "'hidden_size' must be an integer, not a string"),
    ({"hidden_size": True}, "'hidden_size' must be an integer, not a boolean"),
    ({"hidden_size": 64.0}, "'hidden_size' must be an integer, not a number"),
    ({"num_key_value_heads": 5}, "is not a multiple of"),
    ({"vocab_size": 10**9}, "'vocab_size' = 1000000000 is over the limit"),
    ({"rope_theta": "big"}, "'rope_theta' must be a finite number"),
    ({"rms_norm_eps": -1}, "'rms_norm_eps' must be positive"),
    ({"eos_token_id": "x"}, "eos_token_id 'x' is not a token id"),
    ({"num_nextn_predict_layers": 1000}, "over the limit of 16"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 0]}}, "'weight_block_size' must be at least 1"),
    ({"quantization_config": "fp8"}, "'quantization_config' must be an object"),
    ({"vocab_size": 4000}, "the config gives"),  # consistent alone, not with the tensors present
    ({"intermediate_size": 100_000}, "the config gives"),
]


@pytest.mark.parametrize("changes, message", CONFIG_CASES, ids=[next(iter(c)) + "-" + str(i) for i, (c, _) in enumerate(CONFIG_CASES)])
def test_bad_config_values_are_one_line_errors(model, changes, message):
    edit_config(model, **changes)
    assert_one_line_error(runner.invoke(app, ["run", "--model", str(model), "-n", "1", "hi"]), message)


@pytest.mark.parametrize("content, message", [
    ("[]", "expected a JSON object, found a list"),
    ('"mimo"', "expected a JSON object, found a string"),
    ('{"model_type": "mimo", "hidden_size": Infinity}', "'hidden_size' must be an integer"),
    ("[" * 100_000, "not valid JSON"),
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ("x" * (limits.MAX_CONFIG_BYTES + 1), "over the limit of"),
])
def test_malformed_config_files_are_one_line_errors(model, content, message):
    (model / "config.json").write_text(content)
    assert_one_line_error(show(model), message)


def test_a_fifo_config_is_refused_without_blocking(model):
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")
    started = time.monotonic()
    assert_one_line_error(show(model), "config.json: not a regular file")
    assert time.monotonic() - started < 30


# -- safetensors headers -------------------------------------------------------------------------

TENSOR = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header, data, message", [
    ([], b"", "a JSON list, not an object"),
    ("text", b"", "a JSON string, not an object"),
    ({"t": {**TENSOR, "shape": [1e999]}}, b"\0" * 16, "shape must be a list of at most 8 non-negative integers"),
    ({"t": {**TENSOR, "shape": [2.0, 2]}}, b"\0" * 16, "non-negative integers"),
    ({"t": {**TENSOR, "shape": [-2, -2]}}, b"\0" * 16, "non-negative integers"),
    ({"t": {**TENSOR, "shape": ["2", 2]}}, b"\0" * 16, "non-negative integers"),
    ({"t": {**TENSOR, "shape": [1] * 9}}, b"\0" * 16, "at most 8"),
    ({"t": {**TENSOR, "dtype": "F128"}}, b"\0" * 16, "unknown dtype"),
    ({"t": {**TENSOR, "data_offsets": [8, 0]}}, b"\0" * 16, "not 0 <= begin <= end"),
    ({"t": {**TENSOR, "data_offsets": [0, True]}}, b"\0" * 16, "two integers"),
    ({"t": {**TENSOR, "data_offsets": [0, 12]}}, b"\0" * 16, "has 12 bytes, shape [2, 2] needs 16"),
    ({"t": {**TENSOR, "data_offsets": [16, 32]}}, b"\0" * 16, "truncated"),
    ({"t": TENSOR, "u": {**TENSOR, "data_offsets": [8, 24]}}, b"\0" * 24, "tensors 't' and 'u' overlap"),
    ({"t": "x"}, b"", "not an object"),
    (b"\xff\xfe{", b"", "not JSON"),
    (b"[" * 50_000, b"", "not JSON"),
])
def test_malformed_headers_are_one_line_errors(model, header, data, message):
    single_shard(model, header, data)
    assert_one_line_error(show(model), "model.safetensors", message)


def test_header_size_is_capped_before_it_is_read(model):
    # A 99 MB header used to be parsed whole (1.5 GB of memory): the length alone refuses it now.
    padding = b" " * (20 << 20)
    single_shard(model, b"{}" + padding)
    assert_one_line_error(show(model), "header of", "bytes is over the limit of")
    # ... also when the length is only declared (the file is shorter).
    single_shard(model, b"{}", declared_length=99 << 20)
    assert_one_line_error(show(model), "truncated")


def test_header_cap_allows_real_checkpoint_headers():
    # V2-Flash: ~75k tensors in all (48 layers x 256 experts x 3 weights + their FP8 scales) of ~130
    # header bytes each, over many ~5 GB shards; even all of them in one shard would fit.
    assert limits.MAX_HEADER_BYTES >= 75_000 * 130 and limits.MAX_HEADER_ENTRIES >= 75_000
    from mimo_local.checkpoint import header_limit

    assert header_limit(5 << 30) == limits.MAX_HEADER_BYTES
    assert header_limit(100 << 10) >= 1 << 20


def test_duplicate_tensor_across_shards_is_refused(model):
    shards = sorted(model.glob("*.safetensors"))
    shutil.copyfile(shards[0], shards[1])
    assert_one_line_error(show(model), "is in both")


# -- the index's weight_map ----------------------------------------------------------------------


def point_index_at(directory, target):
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = target
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("target, message", [
    ("../../../../etc/passwd", "not a plain relative path inside the model directory"),
    ("/etc/passwd", "not a plain relative path"),
    ("shards\\..\\x.safetensors", "backslash"),
    ("C:x.safetensors", "drive letter"),
    ("a\nb", "control character"),
    (7, "maps to a number"),
])
def test_weight_map_entries_are_confined_to_the_model_directory(model, target, message):
    point_index_at(model, target)
    assert_one_line_error(show(model), message)


def test_weight_map_fifo_outside_and_inside_is_never_opened(model, tmp_path):
    # A FIFO blocks whoever opens it: refusing within the time bound shows it was never opened.
    os.mkfifo(tmp_path / "outside.fifo")
    point_index_at(model, "../outside.fifo")
    started = time.monotonic()
    assert_one_line_error(show(model), "not a plain relative path")
    os.mkfifo(model / "inside.safetensors")
    point_index_at(model, "inside.safetensors")
    assert_one_line_error(show(model), "inside.safetensors: not a regular file")
    assert_one_line_error(runner.invoke(app, ["run", "--model", str(model), "-n", "1", "hi"]), "not a regular file")
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("content, message", [
    ("[]", "expected a JSON object, found a list"),
    ('{"weight_map": []}', "no weight_map object"),
])
def test_malformed_index_is_a_one_line_error(model, content, message):
    (model / "model.safetensors.index.json").write_text(content)
    assert_one_line_error(show(model), message)


# -- mimo list with a broken entry ---------------------------------------------------------------


def test_list_shows_a_broken_model_and_lists_the_rest(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("MIMO_HOME", str(tmp_path / "home"))
    store = tmp_path / "home" / "models"
    for name, breakage in (("good", None), ("bad", {"group_size": "abc"}), ("worse", "config-list")):
        directory = store / f"org--{name}"
        shutil.copytree(checkpoints("mimo", shards=1), directory)
        (directory / ".mimo").mkdir()
        (directory / ".mimo" / "manifest.json").write_text(json.dumps({"name": f"org/{name}", "files": {}}))
        if breakage == "config-list":
            (directory / "config.json").write_text("[]")
        elif breakage:
            edit_config(directory, quantization_config={"quant_method": "gptq", "bits": 4, **breakage})
    result = runner.invoke(app, ["list"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "org/" in line}
    assert set(rows) == {"org/good", "org/bad", "org/worse (broken)"}, result.output
    assert "MiMo-7B" in rows["org/good"] and "gptq 4-bit" in rows["org/bad"]
    assert "broken: " in rows["org/worse (broken)"] and "expected a JSON object" in rows["org/worse (broken)"]
    assert_one_line_error(runner.invoke(app, ["show", str(store / "org--worse")]), "expected a JSON object")
    shown = runner.invoke(app, ["show", str(store / "org--bad")], env={"COLUMNS": "400"})
    assert shown.exit_code == 0 and "gptq 4-bit" in shown.output, shown.output


# -- generated inputs (hypothesis) ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "BF16", "F8_E4M3", "I8", "X"]) | json_values,
    "shape": st.lists(st.integers(-3, 2**40) | json_values, max_size=10) | json_values,
    "data_offsets": st.lists(st.integers(-5, 2**64), min_size=0, max_size=3) | json_values,
}) | json_values
headers = st.dictionaries(st.text(max_size=10), entry, max_size=6) | json_values


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, data=st.binary(max_size=64))
def test_generated_headers_are_valid_or_a_mimo_error(tmp_path, header, data):
    path = tmp_path / "model.safetensors"
    write_header(path, json.dumps(header, allow_nan=True).encode(), data)
    try:
        entries = read_header(path)
    except MimoError as error:
        assert "\n" not in str(error)
        return
    spans = sorted((e.offset, e.offset + e.nbytes) for e in entries if e.nbytes)
    assert all(end <= path.stat().st_size for _, end in spans)
    assert all(a_end <= b_begin for (_, a_end), (b_begin, _) in zip(spans, spans[1:]))
    assert all(type(d) is int and d >= 0 for e in entries for d in e.shape)


@pytest.fixture(scope="module")
def real_configs():
    data = os.path.join(os.path.dirname(__file__), "data")
    return [json.load(open(os.path.join(data, name))) for name in ("mimo-7b-rl.config.json", "mimo-v2-flash.config.json")]


@settings(max_examples=150, deadline=None)
@given(which=st.integers(0, 1), key_index=st.integers(0, 200), value=json_values, drop=st.booleans())
def test_generated_configs_parse_or_give_a_mimo_error(which, key_index, value, drop):
    data = os.path.join(os.path.dirname(__file__), "data")
    name = ("mimo-7b-rl.config.json", "mimo-v2-flash.config.json")[which]
    with open(os.path.join(data, name)) as handle:
        raw = json.load(handle)
    key = sorted(raw)[key_index % len(raw)]
    if drop:
        del raw[key]
    else:
        raw[key] = value
    try:
        config = parse_config(raw)
    except MimoError as error:
        assert "\n" not in str(error)
        return
    assert 1 <= config.num_layers <= limits.MAX_LAYERS and len(config.layer_is_sliding) == config.num_layers
    assert all(type(v) is int and v >= 1 for v in (config.hidden_size, config.vocab_size, config.intermediate_size))
    assert config.global_attention.num_heads % config.global_attention.num_kv_heads == 0


def test_real_configs_are_within_every_limit(real_configs):
    for raw in real_configs:
        parse_config(raw)


# -- memory and time bounds, checked on the real CLI in a subprocess -----------------------------

# `mimo run` on a tiny model needs about 800 MiB of address space (torch included). Without the
# limits each attack needed more than this bound: 20 GB for the layers, 1.1 GB of resident memory to
# parse the 97 MB header, 4 GB for the template's string.
ADDRESS_SPACE = 1 << 30


def run_limited(*args, timeout=240):
    command = ["prlimit", f"--as={ADDRESS_SPACE}", sys.executable, "-m", "mimo_local.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="util-linux prlimit is not installed")
def test_attacks_end_in_one_line_errors_within_a_memory_bound(model, tmp_path):
    layers = tmp_path / "layers"
    shutil.copytree(model, layers)
    edit_config(layers, num_hidden_layers=1_000_000)
    header = tmp_path / "header"
    shutil.copytree(model, header)
    entries = (f'"model.layers.{i}.w":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}' for i in range(1_150_000))
    single_shard(header, ("{" + ",".join(entries) + "}").encode())
    template = tmp_path / "template"
    shutil.copytree(model, template)
    config = json.loads((template / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ 'x' * 20000000 }}{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}"
    (template / "tokenizer_config.json").write_text(json.dumps(config))
    for args, message in (
        (["show", str(layers)], "over the limit of 512"),
        (["show", str(header)], "over the limit of"),
        (["run", "--model", str(template), "-n", "1", "hi"], "'*' would make 20000000 characters"),
    ):
        started = time.monotonic()
        result = run_limited(*args)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
        assert message in result.stderr
        assert time.monotonic() - started < 240


def test_template_render_time_is_capped_in_a_worker_thread(model, monkeypatch):
    from mimo_local.tokenizer import ChatTokenizer

    monkeypatch.setattr(limits, "MAX_RENDER_SECONDS", 0.5)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = ChatTokenizer(model)
    outcome = []

    def render():
        try:
            tokenizer.render_chat([{"role": "user", "content": "hi"}])
        except MimoError as error:
            outcome.append(str(error))

    started = time.monotonic()
    worker = threading.Thread(target=render)
    worker.start()
    worker.join(30)
    assert outcome == ["chat template: rendering took over the limit of 0.5 s"]
    assert time.monotonic() - started < 10


# -- chat templates ------------------------------------------------------------------------------

HOSTILE_TEMPLATES = [
    ("{{ 'x' * 20000000 }}", "'*' would make 20000000 characters"),
    ("{{ 'x' * 10**10 }}", "over the limit of"),
    ("{{ [0] * 10**9 }}", "over the limit of"),
    ("{% for i in range(10**9) %}{{ i }}{% endfor %}", "called with 1000000000, over the limit of 100000"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "rendering took over the limit"),
    ("{{ '{x}'.format_map(1, 2) }}", "chat template failed: TypeError: format_map() takes exactly one argument"),
    ("{{ '{:>1000000000}'.format(1) }}", "format width 1000000000 is over the limit"),
    ("{{ '%1000000000d' % 1 }}", "format width '1000000000' is over the limit"),
    ("{{ '%*d' % (1000000000, 1) }}", "format width '*'"),
    ("{{ 'x'|center(1000000000) }}", "filter 'center' called with 1000000000"),
    ("{{ 'x'.ljust(1000000000) }}", "ljust called with 1000000000"),
    ("{{ 7 ** 100000 }}", "over the limit of 8192 bits"),
    ("{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "a ~ concatenation would make"),
    ("{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", "8192 bits"),
    ("{% set ns = namespace(s='aaaa') %}{% for i in range(40) %}{% set ns.s = ns.s.replace('a', 'aaaa') %}{% endfor %}",
     "str.replace would make"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion too deep"),
    ("{{ range(99999)|list|tojson(indent=99999) }}", "tojson indent 99999 is over the limit of 16"),
    ("{{ range(99999)|join('x' * 99999) }}", "filter 'join' would make"),
    ("{{ ('x\n' * 99999)|indent(99999) }}", "filter 'indent' would make"),
    ("{{ messages.__class__.__mro__ }}", "access to attribute '__class__' of 'list' object is unsafe"),
    ("{{ messages.x }}", ""),  # undefined renders nothing; a lookup on it is jinja2's error below
    ("{{ messages.x.y }}", "chat template failed: 'list object' has no attribute 'x'"),
    ("{{ raise_exception('bad role') }}", "chat template failed: bad role"),
    ("{% for %}", "chat template failed: "),
]


def with_template(directory, template):
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("template, message", HOSTILE_TEMPLATES, ids=range(len(HOSTILE_TEMPLATES)))
def test_hostile_templates_are_bounded_one_line_errors(model, monkeypatch, template, message):
    from mimo_local.tokenizer import ChatTokenizer

    monkeypatch.setattr(limits, "MAX_RENDER_SECONDS", 1.0)
    with_template(model, template)
    started = time.monotonic()
    try:
        text = ChatTokenizer(model).render_chat([{"role": "user", "content": "hi"}])
    except MimoError as error:
        assert message and message in str(error) and "\n" not in str(error), str(error)
    else:
        assert not message and text == ""
    assert time.monotonic() - started < 10


def test_hostile_templates_through_the_cli(model):
    for template, message in HOSTILE_TEMPLATES[3:6]:
        with_template(model, template)
        assert_one_line_error(runner.invoke(app, ["run", "--model", str(model), "-n", "1", "hi"]), message)
    with_template(model, 42)
    assert_one_line_error(runner.invoke(app, ["run", "--model", str(model), "-n", "1", "hi"]), "chat_template is a number")


# A template in the style of MiMo's and Qwen3's (tools, reasoning, namespace, string methods): the
# caps leave it untouched on a long conversation.
REALISTIC_TEMPLATE = """
{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- "# Tools\\n\\n<tools>" }}{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}{{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
{%- if ns.last_query == messages|length - 1 and message.role == 'user' %}{%- set ns.last_query = index %}{%- endif %}{%- endfor %}
{%- for message in messages %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning = '' %}
{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
{%- if loop.index0 > ns.last_query %}{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}
{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}
"""


def test_a_realistic_template_renders_a_long_conversation_with_tools(model):
    from mimo_local.tokenizer import ChatTokenizer

    with_template(model, REALISTIC_TEMPLATE)
    tokenizer = ChatTokenizer(model)
    messages = [{"role": "system", "content": "Be brief."}]
    for turn in range(300):
        messages.append({"role": "user", "content": f"Question {turn}: " + "words " * 200})
        messages.append({"role": "assistant", "content": f"<think>\nreasoning {turn}\n</think>\n\nanswer {turn} " * 20})
    tools = [{"type": "function", "function": {"name": f"tool{i}", "description": "d" * 500,
                                               "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
             for i in range(50)]
    started = time.monotonic()
    text = tokenizer.render_chat(messages, tools=tools, enable_thinking=False)
    assert time.monotonic() - started < limits.MAX_RENDER_SECONDS
    assert text.count("<|im_start|>user") == 300 and text.endswith("<think>\n\n</think>\n\n")
    assert '"name": "tool49"' in text and len(text) > 400_000
