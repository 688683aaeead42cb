from transformers import CLIPModel, CLIPProcessor

from reco_lightning.tiny_clip import build_clip_tokenizer, save_tiny_clip


def test_tokenizer_covers_any_text_without_unknowns():
    tok = build_clip_tokenizer(["a photo of a red square", "a blue circle"] * 3)
    pieces = tok.tokenize("A photo of a red square! Zebra-42 ü")
    assert pieces[:6] == ["a</w>", "photo</w>", "of</w>", "a</w>", "red</w>", "square</w>"]
    ids = tok("zebra!")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]


def test_saved_backbone_loads_through_from_pretrained(tmp_path):
    path = save_tiny_clip(tmp_path / "clip", ["a red square"] * 4, embed_dim=24)
    model = CLIPModel.from_pretrained(path)
    processor = CLIPProcessor.from_pretrained(path)
    assert model.config.projection_dim == 24
    assert model.config.text_config.eos_token_id == processor.tokenizer.eos_token_id
    assert not list(tmp_path.glob(".clip.*")), "no temp dir left behind"
