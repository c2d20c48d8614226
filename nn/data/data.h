// The domain-labelled data layer in one include. Independent of the tensor engine: it produces int32 token batches.
#pragma once

#include "nn/data/document.h"                 // Document, Domains
#include "nn/data/loader.h"                   // Batch, Loader, LoaderOptions, LoaderState, split_every_kth
#include "nn/data/pipeline.h"                 // build_shards
#include "nn/data/readers.h"                  // read_jsonl, read_text_folder
#include "nn/data/sentencepiece_tokenizer.h"  // SentencePieceTokenizer
#include "nn/data/shard.h"                    // Shard, pack_documents, read_shard, write_shard
#include "nn/data/synthetic.h"                // make_synthetic_corpus
#include "nn/data/tokenizer.h"                // Tokenizer, ByteTokenizer, load_tokenizer
