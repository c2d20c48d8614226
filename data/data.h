// The domain-labelled data layer in one include. Independent of the tensor engine: it produces int32 token batches.
#pragma once

#include "data/document.h"                 // Document, Domains
#include "data/loader.h"                   // Batch, Loader, LoaderOptions, LoaderState, split_every_kth
#include "data/pipeline.h"                 // build_shards
#include "data/readers.h"                  // read_jsonl, read_text_folder
#include "data/shard.h"                    // Shard, pack_documents, read_shard, write_shard
#include "data/synthetic.h"                // make_synthetic_corpus
#include "data/tokenizer.h"                // Tokenizer, ByteTokenizer, load_tokenizer
