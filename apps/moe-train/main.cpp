// moe-train: pre-train a (MoE) language model on a domain-labelled corpus.
//   moe-train --preset tiny --data.corpus ~/.cache/moelab/corpus --train.steps 300 --train.out_dir runs/tiny
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <iostream>

#include "apps/train/trainer.h"

int main(int argc, char** argv) {
  CLI::App app{"moe-train: pre-train a Mixture-of-Experts language model (options: preset -> --config file -> flags)"};
  moelab::apps::TrainOptions options(app);
  CLI11_PARSE(app, argc, argv);
  try {
    moelab::apps::TrainConfig config = options.resolve();
    moelab::apps::Trainer trainer(config, std::cout);
    const auto& c = trainer.config();
    fmt::print("moe-train: preset {} | {} params | {} domains ({} train / {} validation sequences of {} tokens)\n",
               c.preset, trainer.model().lm().parameter_count(), trainer.data().domains.size(),
               trainer.data().train->size(), trainer.data().validation->size(), c.model.seq_len);
    fmt::print("metrics log: {}\n", trainer.metrics_path().string());
    trainer.run();
  } catch (const std::exception& e) {
    fmt::print(stderr, "moe-train: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
