"""Tests for optical_hf.data: every input format, every error message, and the filters."""

import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import pytest

from optical_hf.data import BitextError, bitext_from_pairs, load_bitext, load_bitexts
from optical_hf.errors import OpticalInputError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PAIRS = [("Habari ya asubuhi", "Good morning"), ("Asante sana", "Thank you very much"), ("Karibu", "Welcome")]


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def write_text_pair(tmp_path: Path, sources: list[str], targets: list[str]) -> tuple[Path, Path]:
    return (
        write(tmp_path / "train.swa", "".join(f"{line}\n" for line in sources)),
        write(tmp_path / "train.en", "".join(f"{line}\n" for line in targets)),
    )


def rows(bitext: datasets.Dataset) -> list[tuple[str, str]]:
    return list(zip(bitext["source"], bitext["target"]))


def many_pairs(n: int) -> list[tuple[str, str]]:
    return [(f"sentensi {i}", f"sentence {i}") for i in range(n)]


# ---- formats ---------------------------------------------------------------------------------------------------


def test_two_text_files_strip_and_keep_order(tmp_path):
    source, target = write_text_pair(tmp_path, ["  Habari ya asubuhi ", "Asante sana\r", "Karibu"],
                                      ["Good morning", "\tThank you very much", "Welcome  "])
    bitext = load_bitext(source, target)
    assert bitext.column_names == ["source", "target"]
    assert rows(bitext) == PAIRS


def test_text_file_without_final_newline_and_with_bom(tmp_path):
    source = write(tmp_path / "a.swa", "\ufeffHabari ya asubuhi\nAsante sana")
    target = write(tmp_path / "a.en", "Good morning\nThank you very much")
    assert rows(load_bitext(str(source), str(target))) == PAIRS[:2]


def test_tsv_with_header_extra_columns_and_quotes(tmp_path):
    text = 'id\tswa\ten\n1\tHabari ya asubuhi\tGood morning\n\n2\t"Asante ""sana"""\t"Thank you, ""very"" much"\n'
    path = write(tmp_path / "pairs.tsv", text)
    bitext = load_bitext(path, source_column="swa", target_column="en")
    assert rows(bitext) == [("Habari ya asubuhi", "Good morning"), ('Asante "sana"', 'Thank you, "very" much')]


def test_csv_default_columns_with_quoted_comma(tmp_path):
    path = write(tmp_path / "pairs.csv", 'target,source\n"Good morning, friend",Habari ya asubuhi rafiki\n')
    assert rows(load_bitext(path)) == [("Habari ya asubuhi rafiki", "Good morning, friend")]


@pytest.mark.parametrize("ending", ["\r", "\r\n", "\n"], ids=["cr", "crlf", "lf"])
def test_every_line_ending_splits_lines(tmp_path, ending):
    sources, targets = zip(*PAIRS)
    source = write(tmp_path / "mac.swa", ending.join(sources) + ending)
    target = write(tmp_path / "mac.en", ending.join(targets) + ending)
    assert rows(load_bitext(source, target)) == PAIRS
    table = write(tmp_path / "mac.tsv", ending.join(["source\ttarget", *(f"{s}\t{t}" for s, t in PAIRS)]) + ending)
    assert rows(load_bitext(table)) == PAIRS
    lines = write(tmp_path / "mac.jsonl", ending.join(json.dumps({"source": s, "target": t}) for s, t in PAIRS))
    assert rows(load_bitext(lines)) == PAIRS


def test_classic_mac_line_numbers_in_errors(tmp_path):
    source = write(tmp_path / "mac.swa", "Habari\r \rKaribu\r")
    target = write(tmp_path / "mac.en", "Hello\rThanks\rWelcome\r")
    with pytest.raises(BitextError, match=r"mac\.swa, line 2: 'source' is empty"):
        load_bitext(source, target)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_lines(tmp_path, suffix):
    lines = [json.dumps({"question": s, "translated_question": t, "id": i}, ensure_ascii=False)
             for i, (s, t) in enumerate(PAIRS)]
    path = write(tmp_path / f"queries{suffix}", "\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    bitext = load_bitext(path, source_column="question", target_column="translated_question")
    assert rows(bitext) == PAIRS


def test_saved_dataset_folder(tmp_path):
    sources, targets = map(list, zip(*PAIRS))
    columns = {"source": sources, "target": targets, "score": [1.0, 2.0, 3.0]}
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "ds"))
    bitext = load_bitext(tmp_path / "ds")
    assert bitext.column_names == ["source", "target"]
    assert rows(bitext) == PAIRS


def test_saved_dataset_dict_folder_split_selection(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"swa": ["Habari ya asubuhi"], "en": ["Good morning"]}),
        "dev": datasets.Dataset.from_dict({"swa": ["Karibu", "Asante sana"], "en": ["Welcome", "Thank you very much"]}),
    }).save_to_disk(str(folder))
    assert rows(load_bitext(folder, source_column="swa", target_column="en")) == [PAIRS[0]]
    dev = load_bitext(folder, source_column="swa", target_column="en", split="dev")
    assert rows(dev) == [PAIRS[2], PAIRS[1]]
    with pytest.raises(BitextError, match=r"dd.*no split 'test'.*\['train', 'dev'\]"):
        load_bitext(folder, source_column="swa", target_column="en", split="test")


def test_bitext_from_pairs():
    bitext = bitext_from_pairs([(" Karibu ", "Welcome\n")])
    assert rows(bitext) == [("Karibu", "Welcome")]
    with pytest.raises(BitextError, match=r"pairs\[1\].*'target' is empty"):
        bitext_from_pairs([("Karibu", "Welcome"), ("Asante", "  ")])


def test_csv_values_that_pandas_would_turn_into_missing_or_numbers_stay_text(tmp_path):
    path = write(tmp_path / "na.tsv", " source \ttarget\nNA\tnull\n007\tNaN\n")
    assert rows(load_bitext(path)) == [("NA", "null"), ("007", "NaN")]


def test_line_numbers_skip_blank_lines_in_tables(tmp_path):
    path = write(tmp_path / "gaps.csv", "source,target\n\na,b\n   \n\nc, \n")
    with pytest.raises(BitextError, match=r"gaps\.csv, line 6: 'target' is empty"):
        load_bitext(path)


# ---- the Hub translation layout: {"translation": {"en": ..., "sw": ...}} ----------------------------------------


def translation_rows(pairs=PAIRS) -> list[dict]:
    return [{"translation": {"en": t, "sw": s}, "id": i} for i, (s, t) in enumerate(pairs)]


def test_translation_layout_in_a_saved_dataset_dict(tmp_path):
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(translation_rows()),
        "validation": datasets.Dataset.from_list(translation_rows(PAIRS[:1])),
    }).save_to_disk(str(tmp_path / "opus"))
    assert rows(load_bitext(tmp_path / "opus", source_lang="sw", target_lang="en")) == PAIRS
    dotted = load_bitext(tmp_path / "opus", source_column="translation.sw", target_column="translation.en",
                         split="validation")
    assert rows(dotted) == PAIRS[:1]
    expected = r"opus: missing column\(s\) \['translation.ha'\]; columns present: \['translation.en', 'translation.sw'"
    with pytest.raises(BitextError, match=expected):
        load_bitext(tmp_path / "opus", source_lang="ha", target_lang="en")


def test_translation_layout_in_json_lines(tmp_path):
    lines = [json.dumps(row) for row in translation_rows()]
    path = write(tmp_path / "lafand.jsonl", "\n".join(lines) + "\n")
    assert rows(load_bitext(path, source_lang="sw", target_lang="en")) == PAIRS
    broken = write(tmp_path / "broken.jsonl", lines[0] + "\n" + json.dumps({"translation": {"en": "Hi"}}) + "\n")
    expected = (r"broken\.jsonl, line 2: missing column\(s\) \['translation\.sw'\]; "
                r"columns present: \['translation', 'translation\.en'\]")
    with pytest.raises(BitextError, match=expected):
        load_bitext(broken, source_lang="sw", target_lang="en")


def test_hub_dataset_config_is_passed_to_load_dataset(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(translation_rows())})

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    bitext = load_bitext("masakhane/lafand-mt", name="en-sw", source_lang="sw", target_lang="en")
    assert calls == [("masakhane/lafand-mt", "en-sw")]
    assert rows(bitext) == PAIRS
    with pytest.raises(BitextError, match=r"masakhane/lafand-mt \(config 'en-sw'\): column 'id' holds int64"):
        load_bitext("masakhane/lafand-mt", name="en-sw", source_column="id", target_column="translation.en")


def test_language_and_column_options_conflict_and_config_needs_a_hub_id(tmp_path):
    path = write(tmp_path / "pairs.tsv", "swa\ten\nHabari\tHello\n")
    with pytest.raises(BitextError, match=r"give source_lang= or source_column=, not both"):
        load_bitext(path, source_column="swa", source_lang="sw")
    with pytest.raises(BitextError, match=r"pairs\.tsv: name='en-sw' picks a Hub dataset config"):
        load_bitext(path, source_column="swa", target_column="en", name="en-sw")


# ---- errors ----------------------------------------------------------------------------------------------------


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
    source, target = write_text_pair(tmp_path, ["a", "b", "c"], ["x", "y"])
    with pytest.raises(BitextError) as error:
        load_bitext(source, target)
    message = str(error.value)
    assert "train.swa has 3 lines" in message and "train.en has 2 lines" in message


@pytest.mark.parametrize("empty_side", ["source", "target"])
def test_empty_line_names_that_file_and_line(tmp_path, empty_side):
    sides = {"source": ["a", "b", "c"], "target": ["x", "y", "z"]}
    sides[empty_side][1] = "   "
    source, target = write_text_pair(tmp_path, sides["source"], sides["target"])
    bad = source if empty_side == "source" else target
    with pytest.raises(BitextError, match=rf"{bad.name}, line 2: .*empty"):
        load_bitext(source, target)


def test_undecodable_bytes_name_file_line_and_offset(tmp_path):
    source = tmp_path / "latin1.swa"
    source.write_bytes("Habari\nAsante sana\nKaribu sana m".encode() + b"\xe9" + b"\n")
    target = write(tmp_path / "latin1.en", "Hi\nThanks\nWelcome\n")
    with pytest.raises(BitextError, match=r"latin1\.swa, line 3: not valid UTF-8 .*byte offset 32"):
        load_bitext(source, target)


def test_undecodable_bytes_in_tsv(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"source\ttarget\nok\tfine\n\xff\xfe\tx\n")
    with pytest.raises(BitextError, match=r"bad\.tsv, line 3: not valid UTF-8"):
        load_bitext(path)


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_missing_column_lists_present_columns(tmp_path, suffix):
    sep = "\t" if suffix == ".tsv" else ","
    path = write(tmp_path / f"nohead{suffix}", f"Habari{sep}Hello\nKaribu{sep}Welcome\n")
    with pytest.raises(BitextError) as error:
        load_bitext(path)
    message = str(error.value)
    assert f"nohead{suffix}, line 1" in message
    assert "['source', 'target']" in message and "['Habari', 'Hello']" in message


def test_missing_column_in_json_line(tmp_path):
    path = write(tmp_path / "q.jsonl", '{"source": "a", "target": "b"}\n{"source": "c", "tgt": "d"}\n')
    expected = r"q\.jsonl, line 2: missing column\(s\) \['target'\]; columns present: \['source', 'tgt'\]"
    with pytest.raises(BitextError, match=expected):
        load_bitext(path)


def test_missing_column_in_saved_dataset(tmp_path):
    datasets.Dataset.from_dict({"swa": ["a"], "en": ["b"]}).save_to_disk(str(tmp_path / "ds"))
    expected = r"ds: missing column\(s\) \['source', 'target'\]; columns present: \['swa', 'en'\]"
    with pytest.raises(BitextError, match=expected):
        load_bitext(tmp_path / "ds")


def test_empty_value_in_table_and_dataset(tmp_path):
    path = write(tmp_path / "e.tsv", "source\ttarget\na\tb\nc\t \n")
    with pytest.raises(BitextError, match=r"e\.tsv, line 3: 'target' is empty"):
        load_bitext(path)
    datasets.Dataset.from_dict({"source": ["a", ""], "target": ["b", "c"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(BitextError, match=r"ds, row 2: 'source' is empty"):
        load_bitext(tmp_path / "ds")


def test_wrong_field_count_in_tsv(tmp_path):
    path = write(tmp_path / "tabs.tsv", "source\ttarget\na\tb\nc\td\textra\n")
    with pytest.raises(BitextError, match=r"tabs\.tsv, line 3: 3 fields but the header row has 2"):
        load_bitext(path)


@pytest.mark.parametrize("rows_text, end", [
    ('"Habari\tHello\nAsante\tThanks"\nKaribu\tWelcome\nKwaheri\tGoodbye\n', 3),  # the quote closes on line 3
    ('"Habari\tHello\nAsante\tThanks\nKaribu\tWelcome\nKwaheri\tGoodbye\n', 5),  # it never closes
], ids=["closed-later", "never-closed"])
def test_unbalanced_leading_quote_names_the_line(tmp_path, rows_text, end):
    path = write(tmp_path / "quote.tsv", "source\ttarget\n" + rows_text)
    with pytest.raises(BitextError, match=rf"quote\.tsv, line 2: a quoted field runs on to line {end}"):
        load_bitext(path)


def test_quoted_field_with_a_line_break_in_csv(tmp_path):
    path = write(tmp_path / "multi.csv", 'source,target\nHabari,Hello\n"Asante\r\nsana",Thanks\n')
    with pytest.raises(BitextError, match=r"multi\.csv, line 3: a quoted field runs on to line 4"):
        load_bitext(path)


@pytest.mark.parametrize("header, column", [("source,source,target", "source"), ("target,source,target", "target")])
def test_duplicate_header_column_names_it(tmp_path, header, column):
    path = write(tmp_path / "dup.csv", f"{header}\nHabari,Hello,Hi\n")
    with pytest.raises(BitextError, match=rf"dup\.csv, line 1 \(header row\): column '{column}' appears 2 times"):
        load_bitext(path)


def test_bad_json_line(tmp_path):
    path = write(tmp_path / "broken.jsonl", '{"source": "a", "target": "b"}\n\n{"source": "c", "target": \n')
    with pytest.raises(BitextError, match=r"broken\.jsonl, line 3: not valid JSON"):
        load_bitext(path)


def test_non_object_and_non_string_json(tmp_path):
    path = write(tmp_path / "arr.json", '["a", "b"]\n')
    with pytest.raises(BitextError, match=r"arr\.json, line 1: expected a JSON object"):
        load_bitext(path)
    path = write(tmp_path / "num.jsonl", '{"source": "a", "target": 3}\n')
    with pytest.raises(BitextError, match=r"num\.jsonl, line 1: 'target' must be a string, got int"):
        load_bitext(path)


def test_missing_files(tmp_path):
    source, _ = write_text_pair(tmp_path, ["a"], ["b"])
    with pytest.raises(BitextError, match=r"missing\.en: no such file"):
        load_bitext(source, tmp_path / "missing.en")
    with pytest.raises(BitextError, match=r"absent\.tsv: no such file or folder"):
        load_bitext(str(tmp_path / "absent.tsv"))


def test_unknown_hub_id_says_not_found_locally_nor_on_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BitextError, match=r"no-such-org/no-such-bitext: not found locally .*Hugging Face Hub"):
        load_bitext("no-such-org/no-such-bitext")


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    write(tmp_path / "notes.txt", "hello\n")
    with pytest.raises(BitextError, match=rf"{tmp_path.name}: not a folder written by Dataset.save_to_disk"):
        load_bitext(tmp_path)


def test_unsupported_single_file_and_empty_file(tmp_path):
    source, _ = write_text_pair(tmp_path, ["a"], ["b"])
    with pytest.raises(BitextError, match=r"train\.swa: unsupported single-file format '\.swa'.*target="):
        load_bitext(source)
    with pytest.raises(BitextError, match=r"empty\.tsv: empty file"):
        load_bitext(write(tmp_path / "empty.tsv", ""))
    with pytest.raises(BitextError, match=r"e\.swa: no sentence pairs"):
        load_bitext(write(tmp_path / "e.swa", ""), write(tmp_path / "e.en", ""))


def test_invalid_filter_options(tmp_path):
    source, target = write_text_pair(tmp_path, ["a"], ["b"])
    with pytest.raises(OpticalInputError, match="max_length_ratio"):
        load_bitext(source, target, max_length_ratio=0.5)
    with pytest.raises(OpticalInputError, match="max_pairs"):
        load_bitext(source, target, max_pairs=0)


# ---- filters ---------------------------------------------------------------------------------------------------


def test_deduplicate_keeps_first_and_logs(tmp_path, caplog):
    source, target = write_text_pair(tmp_path, ["a", "b", "a", "a ", "c"], ["x", "y", "x", "z", "x"])
    assert len(load_bitext(source, target)) == 5
    with caplog.at_level(logging.INFO, logger="optical_hf.data"):
        bitext = load_bitext(source, target, deduplicate=True)
    assert rows(bitext) == [("a", "x"), ("b", "y"), ("a", "z"), ("c", "x")]
    assert "Read 5 pairs" in caplog.text and "dropped 1 duplicates" in caplog.text and "kept 4" in caplog.text


def test_max_length_ratio(tmp_path):
    sources, targets = ["abc", "abc", "a", "abcdefgh"], ["abcdefghi", "abcdefghij", "abc", "ab"]
    source, target = write_text_pair(tmp_path, sources, targets)
    bitext = load_bitext(source, target, max_length_ratio=3.0)
    assert rows(bitext) == [("abc", "abcdefghi"), ("a", "abc")]


def test_cap_and_seeded_shuffle(tmp_path):
    source, target = write_text_pair(tmp_path, *map(list, zip(*many_pairs(50))))
    assert rows(load_bitext(source, target, max_pairs=5)) == many_pairs(5)
    first = rows(load_bitext(source, target, seed=1))
    assert first == rows(load_bitext(source, target, seed=1))
    assert first != rows(load_bitext(source, target, seed=2))
    assert first != many_pairs(50) and sorted(first) == sorted(many_pairs(50))
    capped = rows(load_bitext(source, target, seed=1, max_pairs=10))
    assert capped == first[:10]


def test_filters_apply_before_cap(tmp_path):
    source, target = write_text_pair(tmp_path, ["a", "a", "b", "c", "abcdefgh"], ["x", "x", "y", "z", "x"])
    bitext = load_bitext(source, target, deduplicate=True, max_length_ratio=2.0, max_pairs=3)
    assert rows(bitext) == [("a", "x"), ("b", "y"), ("c", "z")]


# ---- several languages: one DatasetDict, one student --------------------------------------------------------------


def test_load_bitexts_one_split_per_language(tmp_path):
    source, target = write_text_pair(tmp_path, ["Habari", "Habari", "Karibu"], ["Hello", "Hello", "Welcome"])
    table = write(tmp_path / "ha.tsv", "hau\teng\nSannu\tHello\nNa gode\tThank you\n")
    datasets.Dataset.from_list(translation_rows()).save_to_disk(str(tmp_path / "yo"))
    bitexts = load_bitexts({
        "sw": (source, target),
        "ha": {"source": table, "source_column": "hau", "target_column": "eng", "deduplicate": False},
        "yo": {"source": tmp_path / "yo", "source_lang": "sw", "target_lang": "en"},
    }, deduplicate=True)
    assert isinstance(bitexts, datasets.DatasetDict) and list(bitexts) == ["sw", "ha", "yo"]
    assert rows(bitexts["sw"]) == [("Habari", "Hello"), ("Karibu", "Welcome")]
    assert rows(bitexts["ha"]) == [("Sannu", "Hello"), ("Na gode", "Thank you")]
    assert rows(bitexts["yo"]) == PAIRS
    assert all(bitext.column_names == ["source", "target"] for bitext in bitexts.values())
    with pytest.raises(BitextError, match="no languages given"):
        load_bitexts({})


def test_one_student_trains_on_every_language_of_a_dataset_dict(model_dirs, toy_pairs, tmp_path):
    from conftest import sentence_transformer
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from optical_hf import OTDistillationDataCollator, OTDistillationLoss
    from optical_hf.model_card import StudentCardInfo, render_model_card

    student, teacher = sentence_transformer(model_dirs["student"]), sentence_transformer(model_dirs["teacher"])
    train = datasets.DatasetDict({"sw": bitext_from_pairs(toy_pairs[:48]), "ha": bitext_from_pairs(toy_pairs[48:])})
    batches = []

    class Recording(OTDistillationDataCollator):
        def __call__(self, features):
            batches.append({language for language, bitext in train.items() for row in features
                            if row["source"] in bitext["source"]})
            return super().__call__(features)

    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8, report_to=[],
        save_strategy="no", seed=0, disable_tqdm=True, multi_dataset_batch_sampler="round_robin",
    )
    trainer = SentenceTransformerTrainer(
        model=student, args=args, train_dataset=train, loss=OTDistillationLoss(student, teacher),
        data_collator=Recording(student.preprocess, teacher_preprocess_fn=teacher.preprocess),
    )
    trainer.train()
    assert batches[:6] == [{"sw"}, {"ha"}] * 3  # each batch from one language, in turn (the loader may prefetch)
    card = render_model_card(StudentCardInfo(language=list(train), teacher="org/teacher", train_pairs=96), student)
    assert card.data.language == ["sw", "ha", "en"]
    assert "`sw, ha`" in card.text


# ---- real data -------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED / "data" / "lafand-mt").is_dir(), reason="../shared data not available")
def test_real_lafand_en_swa():
    folder = SHARED / "data" / "lafand-mt" / "en-swa"
    bitext = load_bitext(folder / "train.swa", folder / "train.en")
    assert len(bitext) == 30_782
    assert bitext.column_names == ["source", "target"]
    assert all(bitext[0].values()) and bitext[0]["source"] != bitext[0]["target"]
