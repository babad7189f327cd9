"""The calls published articles about DeepSeek's open-source stack show, run against this
stack: each snippet is kept as the article prints it (only line breaks restored where the
page ran lines together) and run with ``exec``, after a few substitutions that
``adapted`` makes explicit and checks (each must match exactly once):

- a hub model name ("deepseek-7b", "deepseek/67b"...) becomes a tiny local checkpoint
  the test builds (nothing here downloads), a named hub dataset a local JSON Lines file;
- an import of the articles' package names (``deepseek``, ``deepseek_core``,
  ``deepseek_finetune``, ``deepseek_serve``, ``peft``, ``transformers``) becomes the
  ds-* package that ships the same name with the same call;
- a CUDA device becomes the CPU when there is no GPU; four training processes become
  one and a public listening address a loopback test port (the test budget and machine);
- a loop the article leaves to the reader (``deepseek_infer``) is given a recorder.

Where an article defines a layer or a function itself (the dynamic mask, the gated
attention, the batch scheduler), its code is run unchanged as the reference that the
stack's own implementation must equal.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import ds_model
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "ds-tiny-coder"
CUDA = "cuda:0" if torch.cuda.is_available() else "cpu"


def adapted(snippet: str, substitutions: dict[str, str]) -> str:
    """``snippet`` with each ``old -> new`` applied; every ``old`` must occur exactly once,
    so a substitution can never silently stop applying."""
    for old, new in substitutions.items():
        count = snippet.count(old)
        assert count == 1, f"{old!r} occurs {count} times in the snippet"
        snippet = snippet.replace(old, new)
    return snippet


def run(snippet: str, **names) -> dict:
    namespace = {"__name__": "documented_call", **names}
    exec(compile(snippet, "<documented call>", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny llama-shaped checkpoint (it has the q_proj / v_proj the articles' LoRA
    targets) with the shipped model's tokenizer, so Chinese and code prompts encode."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    config = ds_model.ModelConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": 8192,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        }
    )
    ds_model.from_config(config, seed=0).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(SHIPPED / name, path / name)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "custom_dataset.json"
    rows = [
        {"text": f"def handler_{i}(request):\n    return request.value + {i}\n"} for i in range(6)
    ]
    path.write_text(json.dumps(rows))
    return path


# ---- layers the articles define -----------------------------------------------------------

# The dynamic attention mask (article 2, "2.1 动态注意力机制实现").
DYNAMIC_ATTENTION_MASK = """
def dynamic_attention_mask(input_ids, max_length):
    batch_size, seq_length = input_ids.shape
    device = input_ids.device
    # 生成基础掩码(后续token不能关注前置token)
    mask = torch.tril(torch.ones((seq_length, seq_length), device=device)).bool()
    # 动态调整窗口大小(根据序列长度自适应)
    window_size = min(512, seq_length // 2)
    local_mask = torch.zeros((seq_length, seq_length), device=device)
    for i in range(seq_length):
        start = max(0, i - window_size)
        end = min(seq_length, i + window_size)
        local_mask[i, start:end] = 1
    # 合并掩码
    final_mask = mask & local_mask
    return final_mask.unsqueeze(0).expand(batch_size, -1, -1)
"""


def test_the_dynamic_attention_mask_equals_the_published_function():
    import ds_attention

    printed = run(DYNAMIC_ATTENTION_MASK, torch=torch)["dynamic_attention_mask"]
    # As printed, `mask & local_mask` ands a bool and a float tensor, which torch refuses:
    # the function never ran. Its evident meaning, a 0/1 window, is the reference.
    with pytest.raises(NotImplementedError, match="bitwise_and"):
        printed(torch.zeros(1, 4, dtype=torch.long), 2048)
    fixed = adapted(DYNAMIC_ATTENTION_MASK, {"mask & local_mask": "mask & local_mask.bool()"})
    published = run(fixed, torch=torch)["dynamic_attention_mask"]
    for seq_length in [*range(1, 40), 1030]:
        input_ids = torch.zeros(2, seq_length, dtype=torch.long)
        expected = published(input_ids, 2048)
        assert torch.equal(ds_attention.dynamic_attention_mask(input_ids, 2048), expected)


# The gated dynamic attention (article 1, "2.1 模型架构创新").
DYNAMIC_ATTENTION = """
class DynamicAttention(nn.Module):
    def __init__(self, dim, heads=8):
        super().__init__()
        self.gate = nn.Sequential(
            nn.Linear(dim, dim),
            nn.Sigmoid()
        )
        self.attn = nn.MultiheadAttention(dim, heads)
    def forward(self, x):
        gate_output = self.gate(x)
        attn_output, _ = self.attn(x, x, x)
        return gate_output * attn_output + (1-gate_output) * x
"""


def test_the_gated_dynamic_attention_equals_the_published_layer():
    import ds_attention

    torch.manual_seed(0)
    published = run(DYNAMIC_ATTENTION, nn=nn)["DynamicAttention"](64, heads=8).eval()
    ours = ds_attention.DynamicAttention(64, heads=8, causal=False).eval()
    with torch.no_grad():  # the same weights; the published projections' biases set to 0
        published.attn.in_proj_bias.zero_()
        published.attn.out_proj.bias.zero_()
        q, k, v = published.attn.in_proj_weight.chunk(3)
        ours.attn.q_proj.weight.copy_(q)
        ours.attn.k_proj.weight.copy_(k)
        ours.attn.v_proj.weight.copy_(v)
        ours.attn.o_proj.weight.copy_(published.attn.out_proj.weight)
        ours.gate.load_state_dict(published.gate.state_dict())
    x = torch.randn(3, 10, 64)  # (batch, seq, dim); nn.MultiheadAttention takes (seq, batch, dim)
    expected = published(x.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


# The sparse attention class (article 0, "1. 模型架构与训练框架的完整开源"): the article prints
# its constructor and leaves forward as `pass`; the stack ships the layer under the same
# name, built by the same call.
SPARSE_ATTENTION = """
# 示例:DeepSeek稀疏注意力实现片段
class SparseAttention(nn.Module):
    def __init__(self, dim, num_heads, sparse_ratio=0.25):
        super().__init__()
        self.sparse_ratio = sparse_ratio
        self.head_dim = dim // num_heads
        # 稀疏注意力权重初始化
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
    def forward(self, x):
        # 实现稀疏注意力计算逻辑
        pass
"""


def test_sparse_attention_is_built_by_the_published_call_and_computes():
    import ds_attention

    published = run(SPARSE_ATTENTION, nn=nn)["SparseAttention"](64, 4, sparse_ratio=0.25)
    layer = ds_attention.SparseAttention(64, 4, sparse_ratio=0.25)
    # The attributes the published constructor sets, with the same values and shapes.
    assert (layer.sparse_ratio, layer.head_dim) == (published.sparse_ratio, published.head_dim)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert getattr(layer, name).weight.shape == getattr(published, name).weight.shape
    x = torch.randn(2, 256, 64)
    assert published(x) is None  # the article's forward is a placeholder
    assert layer(x).shape == x.shape
    # With every block kept, the sparse layer is the dense one.
    dense = ds_attention.Attention(64, 4)
    dense.load_state_dict(layer.state_dict())
    layer.sparse_ratio = 1.0
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


# The static batcher (article 2, "3.2 部署优化方案"), verbatim but for the inference call
# it leaves to the reader, which here records each batch.
DYNAMIC_BATCH_SCHEDULER = """
class DynamicBatchScheduler:
    def __init__(self, max_batch_size=32, max_tokens=4096):
        self.max_batch_size = max_batch_size
        self.max_tokens = max_tokens
        self.current_batch = []
        self.current_tokens = 0
    def add_request(self, input_ids):
        new_tokens = input_ids.numel()
        if (len(self.current_batch) >= self.max_batch_size or
            self.current_tokens + new_tokens > self.max_tokens):
            self._process_batch()
        self.current_batch.append(input_ids)
        self.current_tokens += new_tokens
    def _process_batch(self):
        if self.current_batch:
            batch = torch.cat(self.current_batch, dim=0)
            # 调用推理引擎
            outputs = deepseek_infer(batch)
            self.current_batch = []
            self.current_tokens = 0
"""


def test_the_batch_scheduler_flushes_where_the_published_one_does():
    import ds_batching

    published_batches, our_batches = [], []
    published = run(DYNAMIC_BATCH_SCHEDULER, torch=torch, deepseek_infer=published_batches.append)
    theirs = published["DynamicBatchScheduler"](max_batch_size=4, max_tokens=40)
    ours = ds_batching.DynamicBatchScheduler(
        max_batch_size=4,
        max_tokens=40,
        on_batch=lambda b: our_batches.append(torch.cat(b.requests)),
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        length = int(torch.randint(1, 20, (1,), generator=generator))
        ids = torch.randint(0, 100, (length,), generator=generator)
        theirs.add_request(ids)
        ours.add_request(ids)
    assert len(our_batches) == len(published_batches) > 5
    for mine, expected in zip(our_batches, published_batches):
        assert torch.equal(mine, expected)
    assert ours.flush() is not None  # ours also hands over the last, partial batch


# ---- model configs --------------------------------------------------------------------------

# DeepSeek-Base's two configurations (article 2, "1.1 模型架构开源体系").
BASE_CONFIGS = """
# 标准配置(适用于16K上下文)
config = {"hidden_size": 1024,"num_attention_heads": 16,"intermediate_size": 4096,"max_position_embeddings": 16384}
# 轻量配置(适用于4K上下文)
light_config = {"hidden_size": 768,"num_attention_heads": 12,"intermediate_size": 3072,"max_position_embeddings": 4096}
"""


def test_the_published_base_configs_are_the_standard_and_light_presets():
    names = run(BASE_CONFIGS)
    for preset, published in (("standard", names["config"]), ("light", names["light_config"])):
        assert {**ds_model.PRESETS[preset], **published} == ds_model.PRESETS[preset]
        built = ds_model.ModelConfig.from_dict({**ds_model.PRESETS[preset], **published})
        assert built == ds_model.ModelConfig.from_preset(preset)


# ---- LoRA, training, loading, generation, serving -----------------------------------------

# LoRA through get_peft_model (article 0, "2. 预训练数据集与微调指南").
PEFT_LORA = """
from peft import LoraConfig, get_peft_model
lora_config = LoraConfig(
    r=16, # 低秩矩阵维度
    lora_alpha=32, # 缩放因子
    target_modules=["q_proj", "v_proj"], # 仅微调查询和值投影层
    lora_dropout=0.1)
model = get_peft_model(base_model, lora_config)
"""


def test_get_peft_model_adapts_only_the_query_and_value_projections(tiny_llama):
    base_model = ds_model.from_pretrained(tiny_llama)
    ids = torch.tensor([[1, 5, 9, 13]])
    before = base_model(ids).logits
    # Adapted: ds-lora ships PEFT's LoraConfig and get_peft_model under the same names.
    snippet = adapted(PEFT_LORA, {"from peft import": "from ds_lora import"})
    model = run(snippet, base_model=base_model)["model"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted_layers = {part for n in trainable for part in n.split(".") if part.endswith("_proj")}
    assert adapted_layers == {"q_proj", "v_proj"}
    model.eval()
    torch.testing.assert_close(model(ids).logits, before)  # a fresh adapter changes nothing


# The fine-tuning toolkit (article 1, "1.1 技术普惠的深层逻辑").
FINETUNE = """
from deepseek_finetune import LoraConfig, Trainer
config = LoraConfig(
target_modules=["q_proj", "v_proj"],
r=16, lora_alpha=32,
lora_dropout=0.1
)
trainer = Trainer(model_path="deepseek-7b", config=config)
trainer.train(data_path="custom_dataset.json", epochs=3)
"""


def test_trainer_with_model_path_and_a_lora_config_trains(
    tiny_llama, dataset, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)  # the Trainer writes its default output directory here
    snippet = adapted(
        FINETUNE,
        {
            # Adapted: the stack's package for the Trainer and LoraConfig is ds_model.
            "from deepseek_finetune import": "from ds_model import",
            # Adapted: a tiny local checkpoint for the hub model; the test's data file.
            '"deepseek-7b"': repr(str(tiny_llama)),
            '"custom_dataset.json"': repr(str(dataset)),
        },
    )
    names = run(snippet)
    trainer = names["trainer"]
    assert trainer.args.num_train_epochs == 3
    adapter = next((tmp_path / "ds-train-output").glob("checkpoint-*"))
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16


# The DPO-era Trainer spelling (article 2, "3.1 模型微调最佳实践").
TRAINER_KEYWORDS = """
from deepseek import LoraConfig, Trainer
lora_config = LoraConfig(r=16,lora_alpha=32,target_modules=["q_proj", "v_proj"],lora_dropout=0.1)
trainer = Trainer(model="deepseek-base",train_dataset="medical_records",lora_config=lora_config,per_device_train_batch_size=8,num_train_epochs=3)
trainer.train()
"""


def test_trainer_with_transformers_keywords_trains(tiny_llama, dataset, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    snippet = adapted(
        TRAINER_KEYWORDS,
        {
            "from deepseek import": "from ds_model import",  # Adapted: the package name.
            '"deepseek-base"': repr(str(tiny_llama)),  # Adapted: local checkpoint.
            '"medical_records"': repr(str(dataset)),  # Adapted: a hub dataset name.
        },
    )
    trainer = run(snippet)["trainer"]
    assert trainer.args.per_device_train_batch_size == 8
    assert trainer.args.num_train_epochs == 3
    assert list((tmp_path / "ds-train-output").glob("checkpoint-*/adapter_model.safetensors"))


# Loading and generating (article 1 "3.1 快速入门指南", article 3 "四、开发者实践指南").
AUTOMODEL = """
from deepseek_core import AutoModel
model = AutoModel.from_pretrained("deepseek-7b", device="cuda:0")
"""
GENERATE = """
from deepseek import AutoModel
model = AutoModel.from_pretrained("deepseek/67b", device="cuda")
output = model.generate("解释量子纠缠现象:", max_length=200)
"""


def test_automodel_loads_and_generates_with_max_length(tiny_llama):
    loaded = run(
        adapted(
            AUTOMODEL,
            {
                "from deepseek_core import": "from ds_model import",  # Adapted: package name.
                '"deepseek-7b"': repr(str(tiny_llama)),  # Adapted: local checkpoint.
                '"cuda:0"': repr(CUDA),  # Adapted: the CPU where there is no GPU.
            },
        )
    )["model"]
    assert loaded.device.type == torch.device(CUDA).type
    names = run(
        adapted(
            GENERATE,
            {
                "from deepseek import": "from ds_model import",
                '"deepseek/67b"': repr(str(tiny_llama)),
                '"cuda"': repr(CUDA.split(":")[0]),
            },
        )
    )
    model, output = names["model"], names["output"]
    assert isinstance(output, str) and output
    prompt_ids = model.tokenizer.encode("解释量子纠缠现象:")
    # max_length counts the prompt, as in transformers: 200 tokens in all unless EOS ends it.
    new_ids = list(model.generate(prompt_ids, max_length=200))
    eos = set(model.config.eos_token_ids)
    assert len(prompt_ids) + len(new_ids) == 200 or new_ids[-1] in eos
    assert output == model.generate("解释量子纠缠现象:", max_new_tokens=200 - len(prompt_ids))


# A quantized model loaded the transformers way (article 0, "3. 推理优化工具链").
QUANTIZED_LOAD = """
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("deepseek/model-quantized",torch_dtype=torch.float16,device_map="auto")
"""


def test_a_quantized_save_loads_with_torch_dtype_and_device_map(tiny_llama, tmp_path):
    quantized_dir = tmp_path / "model-quantized"
    ds_model.from_pretrained(tiny_llama, quantization="int8").save_pretrained(quantized_dir)
    snippet = adapted(
        QUANTIZED_LOAD,
        {
            # Adapted: transformers does not read ds-quant's format; ds-model's AutoModel
            # takes the same from_pretrained keywords.
            "from transformers import AutoModelForCausalLM": (
                "from ds_model import AutoModel as AutoModelForCausalLM"
            ),
            '"deepseek/model-quantized"': repr(str(quantized_dir)),  # Adapted: local save.
        },
    )
    model = run(snippet, torch=torch)["model"]
    assert model.dtype == torch.float16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8  # as saved
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


# Serving (article 1, "3.2 高级开发技巧").
SERVE = """
from deepseek_serve import create_app
app = create_app(model_path="finetuned-model")
app.run(host="0.0.0.0", port=8000)
"""


def test_create_app_serves_a_model_directory(tiny_llama, monkeypatch):
    import httpx
    from ds_serve.app import App

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    servers = []

    def run_in_background(self, host, port, **options):
        server = self.make_server(host, port, **options)
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)

    monkeypatch.setattr(App, "run", run_in_background)  # returns so the test can ask
    snippet = adapted(
        SERVE,
        {
            "from deepseek_serve import": "from ds_serve import",  # Adapted: package name.
            '"finetuned-model"': repr(str(tiny_llama)),  # Adapted: a local model directory.
            # Adapted: a test listens on loopback and a free port, not all interfaces.
            'host="0.0.0.0", port=8000': f'host="127.0.0.1", port={port}',
        },
    )
    run(snippet)
    [server] = servers
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "tiny-llama", "prompt": "def add(a, b):", "max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.should_exit = True


# ---- the training command line ---------------------------------------------------------------

# Article 1, "3.1 快速入门指南" (ds_train) and article 2, "1.2 训练框架开源组件" (deepseek-train).
DS_TRAIN = """ds_train --model deepseek-7b \\
--data path/to/data \\
--lora_rank 16 \\
--gpus 4"""
DEEPSEEK_TRAIN = """deepseek-train \\
--model deepseek-base \\
--dataset wikipedia \\
--batch_size 256 \\
--learning_rate 3e-4 \\
--distributed_strategy 3d_parallel"""


def command_line(text: str) -> list[str]:
    return text.replace("\\\n", " ").split()[1:]


def test_ds_train_with_lora_rank(tiny_llama, dataset, tmp_path):
    from ds_model.training.cli import main

    argv = command_line(
        adapted(
            DS_TRAIN,
            {
                "deepseek-7b": str(tiny_llama),  # Adapted: local checkpoint.
                "path/to/data": str(dataset),  # Adapted: the test's data.
                # Adapted: one process, not four: --gpus 4 launches four ranks (gloo on a
                # CPU), which the distributed tests cover; here it would cost a minute.
                "--gpus 4": "--gpus 1",
            },
        )
    )
    # Kept short: two steps, into the test's directory.
    assert (
        main([*argv, "--max_steps", "2", "--output", str(tmp_path / "out"), "--no_progress"]) == 0
    )
    config = json.loads((tmp_path / "out" / "checkpoint-2" / "adapter_config.json").read_text())
    assert config["r"] == 16


def test_deepseek_train_with_3d_parallel(tiny_llama, dataset, tmp_path):
    from ds_model.training.cli import main

    argv = command_line(
        adapted(
            DEEPSEEK_TRAIN,
            {
                "deepseek-base": str(tiny_llama),  # Adapted: local checkpoint.
                "wikipedia": str(dataset),  # Adapted: a hub dataset name; local data.
            },
        )
    )
    out = tmp_path / "out"
    assert (
        main([*argv, "--max_steps", "1", "--seq_len", "32", "--output", str(out), "--no_progress"])
        == 0
    )
    assert (out / "checkpoint-1" / "config.json").is_file()
