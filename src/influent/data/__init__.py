"""Corpora (bundled, local files, Hugging Face datasets), stable example ids and saved splits."""

from influent.data.corpus import Corpus, normalise_text, text_id
from influent.data.loaders import build_corpus, load_corpus, load_hf, load_local, load_rotten_tomatoes
from influent.data.split import Split, load_or_make_split, split_path, stratified_sample, stratified_split

__all__ = [
    "Corpus",
    "Split",
    "build_corpus",
    "load_corpus",
    "load_hf",
    "load_local",
    "load_or_make_split",
    "load_rotten_tomatoes",
    "normalise_text",
    "split_path",
    "stratified_sample",
    "stratified_split",
    "text_id",
]
