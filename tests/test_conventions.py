"""transformers' conventions that users' own tools rely on: the Trainer's loss normalisation under gradient
accumulation, tuple outputs, embeddings in place of ids, export and compilation of the understanding forward."""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from harmon_hf import HarmonForConditionalGeneration


@pytest.fixture(scope="module")
def model_without_dropout(tiny_folder):
    """The tiny model with the MAR blocks' dropout off, so that training steps are deterministic."""
    return HarmonForConditionalGeneration.from_pretrained(tiny_folder, dtype=torch.float32, attention_dropout=0.0,
                                                          hidden_dropout=0.0)


def _conversations(golden, count: int = 4) -> list[dict]:
    """`count` image-text examples of one length whose answers have different numbers of label tokens: a mean per
    micro-batch then weighs tokens differently from the mean over all of them."""
    examples = []
    for index in range(count):
        row = index % 2
        labels = golden["und.labels"][row].clone()
        supervised = (labels != -100).nonzero().flatten()
        labels[supervised[: index * len(supervised) // (2 * count)]] = -100  # fewer label tokens for later examples
        examples.append({"input_ids": golden["und.input_ids"][row], "attention_mask": golden["und.attention_mask"][row],
                         "pixel_values": golden["und.pixel_values"][row], "labels": labels})
    return examples


def _train_one_step(model, examples, tmp_path, batch_size: int, accumulation: int):
    model = copy.deepcopy(model)
    arguments = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch_size,
                                  gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.1,
                                  optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, report_to=[],
                                  save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0,
                                  seed=0)
    dataset = Dataset.from_list([{key: value.tolist() for key, value in example.items()} for example in examples])
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset.with_format("torch"))
    trainer.train()
    return model, trainer.state.log_history[0]["loss"]


def test_gradient_accumulation_gives_the_update_of_one_large_batch(model_without_dropout, golden, tmp_path):
    """A plain Trainer passes num_items_in_batch because forward takes **kwargs: the loss must honour it, or 4
    accumulation steps give gradients 4x too large (and tokens weighed per micro-batch)."""
    examples = _conversations(golden)
    large, large_loss = _train_one_step(model_without_dropout, examples, tmp_path / "large", 4, 1)
    accumulated, accumulated_loss = _train_one_step(model_without_dropout, examples, tmp_path / "accumulated", 1, 4)
    assert accumulated_loss == pytest.approx(large_loss, rel=1e-4)
    before = dict(model_without_dropout.named_parameters())
    for name, parameter in large.named_parameters():
        update = parameter.detach() - before[name].detach()
        other = dict(accumulated.named_parameters())[name].detach() - before[name].detach()
        assert torch.allclose(other, update, rtol=1e-3, atol=1e-7), name


def test_shift_labels_replace_the_shifted_labels(model_without_dropout, golden):
    inputs = dict(input_ids=golden["und.input_ids"], attention_mask=golden["und.attention_mask"],
                  pixel_values=golden["und.pixel_values"])
    labels = golden["und.labels"]
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    with torch.no_grad():
        expected = model_without_dropout(**inputs, labels=labels).loss
        assert torch.equal(model_without_dropout(**inputs, labels=labels, shift_labels=shifted).loss, expected)
        other = shifted.clone()
        other[other != -100] = 0
        assert not torch.equal(model_without_dropout(**inputs, labels=labels, shift_labels=other).loss, expected)


def test_tuple_outputs(tiny_model, golden):
    inputs = dict(input_ids=golden["und.input_ids"], attention_mask=golden["und.attention_mask"],
                  pixel_values=golden["und.pixel_values"], labels=golden["und.labels"])
    with torch.no_grad():
        as_dict = tiny_model(**inputs)
        loss, logits, *_ = tiny_model(**inputs, return_dict=False)
        hidden, *_ = tiny_model.model(**{k: v for k, v in inputs.items() if k != "labels"}, return_dict=False)
    assert torch.equal(loss, as_dict.loss) and torch.equal(logits, as_dict.logits)
    assert hidden.shape == (*golden["und.input_ids"].shape, tiny_model.config.text_config.hidden_size)


def test_embeddings_in_place_of_ids_with_an_image(tiny_model, golden):
    """As in LLaVA: the placeholders are found among the embeddings, where the image token's embedding stands."""
    input_ids = golden["und.input_ids"]
    inputs = dict(attention_mask=golden["und.attention_mask"], pixel_values=golden["und.pixel_values"])
    with torch.no_grad():
        expected = tiny_model(input_ids=input_ids, **inputs).logits
        embeddings = tiny_model.get_input_embeddings()(input_ids)
        assert torch.equal(tiny_model(inputs_embeds=embeddings, **inputs).logits, expected)


def _understanding_inputs(golden) -> dict:
    return dict(input_ids=golden["und.input_ids"], attention_mask=golden["und.attention_mask"],
                pixel_values=golden["und.pixel_values"], use_cache=False)


@torch.no_grad()
def test_the_understanding_forward_exports_with_an_image(tiny_model, golden):
    inputs = _understanding_inputs(golden)
    exported = torch.export.export(tiny_model, args=(), kwargs=inputs, strict=False)
    assert torch.equal(exported.module()(**inputs).logits, tiny_model(**inputs).logits)


@torch.no_grad()
def test_the_understanding_forward_compiles_without_a_graph_break(tiny_model, golden):
    """The data checks (pixel range, placeholder count) run eagerly only, and understanding encodes every token
    without the data-dependent selection that generation's partial masks need."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(tiny_model)(**_understanding_inputs(golden))
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


@torch.no_grad()
def test_image_features_follow_transformers_output_api(tiny_model, golden):
    """As LLaVA's in transformers 5: `pooler_output` holds what replaces the placeholders, `last_hidden_state` the
    vision encoder's output; `return_dict=False` gives the tuple."""
    pixel_values = golden["und.pixel_values"]
    config = tiny_model.config
    outputs = tiny_model.get_image_features(pixel_values)
    tokens = (pixel_values.shape[-1] // config.vae_stride) ** 2 + config.buffer_size
    assert outputs.pooler_output.shape == (len(pixel_values), tokens, config.text_config.hidden_size)
    assert outputs.last_hidden_state.shape[:2] == (len(pixel_values), tokens)
    last_hidden_state, pooler_output = tiny_model.get_image_features(pixel_values, return_dict=False)
    assert torch.equal(pooler_output, outputs.pooler_output) and torch.equal(last_hidden_state, outputs.last_hidden_state)


@torch.no_grad()
def test_decoding_with_a_static_cache_traces_as_one_graph(tiny_model, golden):
    """What `_can_compile_fullgraph` promises `generate`: with a static cache its decoding step compiles whole, and
    static-cache decoding answers as the dynamic cache does."""
    from transformers import StaticCache

    assert tiny_model._can_compile_fullgraph
    inputs = {key: golden[f"und.{key}"][:1] for key in ("input_ids", "attention_mask", "pixel_values")}
    length = inputs["input_ids"].shape[1]
    expected = tiny_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    static = tiny_model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static",
                                 disable_compile=True)
    assert torch.equal(static, expected)
    cache = StaticCache(config=tiny_model.config.text_config, max_cache_len=length + 4)
    tiny_model(**inputs, cache=cache, use_cache=True)
    step = dict(input_ids=expected[:, length : length + 1], cache=cache, use_cache=True,
                attention_mask=torch.ones(1, length + 1, dtype=inputs["attention_mask"].dtype),
                position_ids=torch.tensor([[length]]))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(tiny_model)(**step)
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]
