"""Chat templates: the exact text of nanoseek's default template, and equality with transformers'
``apply_chat_template`` for the default template and for a Llama-style template in a test-built tokenizer."""

import json

import pytest

from nanoseek.chat import DEFAULT_CHAT_TEMPLATE
from nanoseek.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 2+4?"},
]


def render_chat(source, messages, **kw) -> str:
    return (source if isinstance(source, Tokenizer) else Tokenizer.load(source)).template().render(messages, **kw)

LLAMA_TEMPLATE = (  # Llama-2-chat's template, as shipped in its tokenizer_config.json
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def test_default_template_exact_text(tmp_path):
    tok = Tokenizer.char()
    expected = "System: You are terse.\n\nUser: What is 2+3?\nAssistant: 5<eos>\nUser: And 2+4?\nAssistant: "
    assert render_chat(tok, CONVERSATION) == expected
    assert render_chat(tok, CONVERSATION, add_generation_prompt=False) == expected[: -len("Assistant: ")]
    # system_prompt: prepended when the conversation has none, the conversation's own wins otherwise
    assert render_chat(tok, CONVERSATION[1:2], system_prompt="Be brief.") == \
        "System: Be brief.\n\nUser: What is 2+3?\nAssistant: "
    assert render_chat(tok, CONVERSATION, system_prompt="Be brief.") == expected
    # the EOS of an assistant turn is one token: the rendered template's special tokens are parsed, text's are not
    rendered = render_chat(tok, CONVERSATION[:3], add_generation_prompt=False)
    ids = tok.encode(rendered, parse_specials=True)
    assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id
    assert tok.eos_id not in tok.encode(rendered) and tok.decode(tok.encode(rendered)) == rendered


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_default_template_matches_transformers(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    if kind == "char":
        tok = Tokenizer.char()
    else:
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("User: hello there\nAssistant: general kenobi\n" * 50)
        tok = Tokenizer.train_bpe([corpus.read_text()], vocab_size=300)
    tok.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["chat_template"] == \
        DEFAULT_CHAT_TEMPLATE
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    loaded = Tokenizer.load(tmp_path / "tok")
    for messages in (CONVERSATION, CONVERSATION[1:2], CONVERSATION[:3]):
        for gen in (True, False):
            ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert render_chat(tmp_path / "tok", messages, add_generation_prompt=gen) == ref
            assert render_chat(loaded, messages, add_generation_prompt=gen) == ref
            assert render_chat(hf.name_or_path, messages, add_generation_prompt=gen) == ref


def _llama_style_dir(tmp_path):
    """A word-level `tokenizers` tokenizer with Llama's special tokens, saved as an HF directory by transformers."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "hi", "there"]
    raw = HFTok(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>")
    hf.chat_template = LLAMA_TEMPLATE
    hf.save_pretrained(tmp_path / "llama")
    return transformers.AutoTokenizer.from_pretrained(tmp_path / "llama", local_files_only=True), tmp_path / "llama"


def test_llama_style_template_matches_transformers(tmp_path):
    hf, directory = _llama_style_dir(tmp_path)
    convo = [{"role": "system", "content": "Sys."}, {"role": "user", "content": " Hi "},
             {"role": "assistant", "content": "There."}, {"role": "user", "content": "Again?"}]
    ref = hf.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    assert ref == "<s>[INST] <<SYS>>\nSys.\n<</SYS>>\n\n Hi [/INST] There. </s><s>[INST] Again? [/INST]"
    assert render_chat(directory, convo) == ref
    codec = Tokenizer.load(directory)  # any tokenizer.json: the template's own <s> is not doubled
    assert render_chat(codec, convo) == ref
    assert codec.encode_prompt(ref) == hf(ref, split_special_tokens=True)["input_ids"]  # a plain string is text
    ids = hf.apply_chat_template(convo, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert codec.encode_prompt(convo) == ids and ids[0] == 1
    # its post-processor adds no BOS, so a plain prompt gets none (transformers' rule)
    assert codec.encode_prompt("hi") == hf("hi")["input_ids"] == [5] and codec.stop_ids == (2,)
    assert codec.decode(codec.encode_prompt("hi there")) == hf.decode(hf("hi there")["input_ids"])
    codec.save(tmp_path / "again")  # what a trainer saves beside a checkpoint: transformers reads it back
    again = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(tmp_path / "again", local_files_only=True)
    assert again.apply_chat_template(convo, tokenize=False, add_generation_prompt=True) == ref
    # the same template in tokenizer_config.json (as transformers 4 saves it) instead of chat_template.jinja
    (directory / "chat_template.jinja").unlink()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA_TEMPLATE}))
    assert render_chat(directory, convo) == ref
    # raise_exception in the template becomes a ValueError with its message
    with pytest.raises(ValueError, match="roles must alternate"):
        render_chat(directory, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([["user", "hi"]], "message 0 is a list"),
    ([{"role": "tool", "content": "x"}], "message 0 has role 'tool'; use one of system, user, assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}], "message 1 .assistant. needs 'content'"),
])
def test_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(Tokenizer.char(), messages)


def test_no_template_and_bad_template(tmp_path):
    _, directory = _llama_style_dir(tmp_path)  # not nanoseek's special tokens: no default template
    (directory / "chat_template.jinja").unlink()
    (directory / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(directory, [{"role": "user", "content": "hi"}])
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    with pytest.raises(ValueError, match="does not parse"):
        render_chat(directory, [{"role": "user", "content": "hi"}])


def test_nanoseek_tokenizer_saved_without_template_gets_the_default(tmp_path):
    Tokenizer.char().save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.load(tmp_path).chat_template == DEFAULT_CHAT_TEMPLATE
    custom = Tokenizer.char()
    custom.chat_template = "{{ messages[0]['content'] }}!"
    custom.save(tmp_path)
    assert render_chat(Tokenizer.load(tmp_path), CONVERSATION[1:2]) == "What is 2+3?!"


def test_prompt_and_sft_texts():
    t = Tokenizer.char()
    assert t.prompt_text("37+48=") == "37+48="  # plain strings as they are (TRL's standard format)
    assert t.prompt_text("37+48=", system_prompt="Add.") == "System: Add.\n\nUser: 37+48=\nAssistant: "
    assert t.prompt_text(CONVERSATION[1:2]) == "User: What is 2+3?\nAssistant: "
    assert t.sft_texts("2+3=", "5") == ("2+3=", "5", True)
    row = t.sft_texts(CONVERSATION[1:2], [{"role": "assistant", "content": "5"}])
    assert row == ("User: What is 2+3?\nAssistant: ", "5<eos>", False)
    assert t.sft_texts("What is 2+3?", [{"role": "assistant", "content": "5"}]) == row
    assert t.sft_texts("What is 2+3?", "5", system_prompt="Be brief.") == \
        ("System: Be brief.\n\nUser: What is 2+3?\nAssistant: ", "5<eos>", False)
    with pytest.raises(ValueError, match="need a chat template"):
        Tokenizer(t.tok, chat_template=None).prompt_text(CONVERSATION)
    tok = Tokenizer.char()
    assert tok.encode_prompt("User: hi") == tok.encode("User: hi", add_bos=True)
    assert tok.encode_prompt(CONVERSATION[1:2], "Add.") == tok.encode(t.prompt_text("What is 2+3?", "Add."), True)
    assert tok.stop_ids == (tok.eos_id,)
