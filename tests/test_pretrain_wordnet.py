"""WordNet usage examples as a public pretraining corpus: parsed from hand-made WordNet files, missing data refused."""

import pytest

from pflm.commands.pretrain import public_corpus
from pflm.data.corpora import wordnet_text
from pflm.errors import ConfigError, DataError

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
NOUN = (HEADER + '00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived "the entity was '
        'real"; "a second example" \n02084071 05 n 01 dog 0 000 | a domesticated canid \n')
VERB = HEADER + '01926311 38 v 01 run 0 000 | move fast by using legs; "he ran to the store"  \n'


@pytest.fixture
def wn_dir(tmp_path, monkeypatch):
    (tmp_path / "data.noun").write_text(NOUN, encoding="latin-1")
    (tmp_path / "data.verb").write_text(VERB, encoding="latin-1")
    (tmp_path / "data.adj").write_text(HEADER, encoding="latin-1")
    (tmp_path / "data.adv").write_text(HEADER + '00001 02 r 01 caf\xe9 0 000 | ok; "caf\xe9 au lait" \n',
                                       encoding="latin-1")
    monkeypatch.setenv("WNSEARCHDIR", str(tmp_path))
    return tmp_path


def test_examples_are_the_quoted_usage_examples_only(wn_dir):
    assert wordnet_text.data_dir() == wn_dir
    # definitions ("that which is perceived", "a domesticated canid") and the licence header are not examples
    assert wordnet_text.sentences() == ["the entity was real", "a second example", "he ran to the store",
                                        "caf\u00e9 au lait"]


def test_public_corpus_combines_and_labels_its_licences(wn_dir):
    texts, name, licence = public_corpus("chatterbot+wordnet")
    assert "he ran to the store" in texts and len(texts) > 4000  # chatterbot's dialogues come first
    assert name == "chatterbot+wordnet-examples" and "BSD" in licence and "WordNet 3.0" in licence
    assert public_corpus("wordnet")[0] == wordnet_text.sentences()


def test_missing_or_empty_wordnet_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WNSEARCHDIR", str(tmp_path / "nowhere"))
    monkeypatch.delenv("WNHOME", raising=False)
    monkeypatch.setattr(wordnet_text, "DEFAULT_DIRS", ())
    with pytest.raises(DataError, match="apt-get install wordnet-base"):
        wordnet_text.sentences()
    for name in wordnet_text.DATA_FILES:
        (tmp_path / name).write_text(HEADER, encoding="latin-1")
    with pytest.raises(DataError, match="no usage examples"):
        wordnet_text.sentences(tmp_path)
    with pytest.raises(ConfigError, match="--corpus"):
        public_corpus("gutenberg")
