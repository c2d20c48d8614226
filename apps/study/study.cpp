#include "apps/study/study.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "data/file_io.h"
#include "engine/error.h"

namespace moelab::apps {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Keys the study sets itself: a run's seed and folder come from the grid, and one preset is shared.
const std::map<std::string, std::string> kStudyOwnedKeys = {
    {"preset", "study.preset"},
    {"train.seed", "study.seeds"},
    {"train.out_dir", "study.out_dir (or moe-study --out)"},
    {"train.resume", "moe-study itself (it resumes unfinished runs)"}};

// A TOML value as the file spells it, on one line (for error messages).
std::string value_text(const toml::node& node) {
  std::ostringstream printed;
  node.visit([&](const auto& value) { printed << value; });
  std::string line = printed.str();
  std::replace(line.begin(), line.end(), '\n', ' ');
  return line;
}

// Calls f(dotted key, value) for every value that is not a table (arrays count as values).
void for_each_leaf(const toml::table& table, const std::function<void(const std::string&, const toml::node&)>& f,
                   const std::string& prefix = "") {
  for (const auto& [key, node] : table) {
    const std::string name = prefix + std::string(key.str());
    if (const toml::table* sub = node.as_table())
      for_each_leaf(*sub, f, name + ".");
    else
      f(name, node);
  }
}

// A key part as TOML writes it: bare when it can be, else quoted.
std::string toml_key(std::string_view key) {
  const bool bare = !key.empty() && std::all_of(key.begin(), key.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
  });
  if (bare) return std::string(key);
  std::ostringstream quoted;
  quoted << toml::value<std::string>(std::string(key));
  return quoted.str();
}

// A table as TOML text, one "dotted.key = value" line per value (apply_toml reads it back to the same values; the
// report and results.json show it). Floats are written shortest (0.05, not 0.050000000000000003).
std::string toml_text(const toml::table& table, const std::string& prefix = "") {
  std::string text;
  for (const auto& [key, node] : table) {
    const std::string name = prefix + toml_key(key.str());
    if (const toml::table* sub = node.as_table()) {
      text += toml_text(*sub, name + ".");
    } else if (const toml::value<double>* real = node.as_floating_point()) {
      std::string number = fmt::format("{}", real->get());
      if (number.find_first_of(".eEni") == std::string::npos) number += ".0";  // stays a float
      text += name + " = " + number + "\n";
    } else {
      text += name + " = " + value_text(node) + "\n";
    }
  }
  return text;
}

// Replaces every string value "@name" by replace(dotted key, name).
void substitute_references(toml::table& table,
                           const std::function<std::string(const std::string&, const std::string&)>& replace,
                           const std::string& prefix = "") {
  for (auto&& [key, node] : table) {
    const std::string name = prefix + std::string(key.str());
    if (toml::table* sub = node.as_table())
      substitute_references(*sub, replace, name + ".");
    else if (toml::value<std::string>* text = node.as_string(); text && text->get().starts_with("@"))
      text->get() = replace(name, text->get().substr(1));
  }
}

void check_keys(const toml::table& table, const std::set<std::string>& known, const std::string& where) {
  for (const auto& [key, node] : table)
    if (!known.count(std::string(key.str())))
      fail("{}: unknown key '{}' (expected one of: {})", where, key.str(), fmt::join(known, ", "));
}

std::string get_string(const toml::table& table, const char* key, const std::string& where, std::string fallback) {
  const toml::node* node = table.get(key);
  if (!node) return fallback;
  if (!node->is_string()) fail("{}: {} must be a string, got {}", where, key, value_text(*node));
  return node->as_string()->get();
}

int64_t get_count(const toml::table& table, const char* key, const std::string& where, int64_t fallback) {
  const toml::node* node = table.get(key);
  if (!node) return fallback;
  if (!node->is_integer() || node->as_integer()->get() < 0)
    fail("{}: {} must be an integer >= 0, got {}", where, key, value_text(*node));
  return node->as_integer()->get();
}

bool is_valid_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
           c == '-';
  });
}

// The options of one table ([train] or a condition's): none the study sets itself; the names its "@name" values
// refer to, in order of appearance.
std::vector<std::string> check_options(const toml::table& options, const std::string& where) {
  std::vector<std::string> needs;
  for_each_leaf(options, [&](const std::string& key, const toml::node& node) {
    if (auto it = kStudyOwnedKeys.find(key); it != kStudyOwnedKeys.end())
      fail("{}: {} cannot be set here: it is set by {}", where, key, it->second);
    if (const toml::value<std::string>* text = node.as_string(); text && text->get().starts_with("@"))
      if (std::find(needs.begin(), needs.end(), text->get().substr(1)) == needs.end())
        needs.push_back(text->get().substr(1));
  });
  return needs;
}

fs::path run_dir(const Study& study, const std::string& condition, uint64_t seed) {
  return study.out_dir / condition / fmt::format("seed{}", seed);
}

}  // namespace

const StudyCondition& Study::condition(const std::string& wanted) const {
  for (const StudyCondition& c : conditions)
    if (c.name == wanted) return c;
  fail("{}: no condition named '{}'", source, wanted);
}

std::vector<const StudyCondition*> Study::table_conditions() const {
  std::vector<const StudyCondition*> out;
  for (const StudyCondition& c : conditions)
    if (c.table) out.push_back(&c);
  return out;
}

Study parse_study(const std::string& text, const std::string& source, const fs::path& out_dir) {
  toml::table doc;
  try {
    doc = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    std::ostringstream where;
    where << e.source().begin;
    fail("{}: {} ({})", source, e.description(), where.str());
  }
  check_keys(doc, {"study", "train", "condition"}, source);
  Study study;
  study.source = source;

  // [study]
  const toml::table* s = doc["study"].as_table();
  if (!s) fail("{}: no [study] table (name, preset, seeds, reference, out_dir, ...)", source);
  const std::string where = source + " [study]";
  check_keys(*s,
             {"name", "description", "preset", "seeds", "reference", "out_dir", "eval_batches", "permutations",
              "similarity_tokens"},
             where);
  study.name = get_string(*s, "name", where, fs::path(source).stem().string());
  if (!is_valid_name(study.name)) fail("{}: name must be made of [A-Za-z0-9_.-], got '{}'", where, study.name);
  study.description = get_string(*s, "description", where, "");
  study.preset = get_string(*s, "preset", where, "tiny");
  try {
    train_preset(study.preset);
  } catch (const std::exception& e) {
    fail("{}: preset: {}", where, e.what());
  }
  const toml::array* seeds = s->get_as<toml::array>("seeds");
  if (!seeds || seeds->empty()) fail("{}: seeds must be a non-empty array of integers >= 0, e.g. [1, 2, 3]", where);
  for (const toml::node& seed : *seeds) {
    if (!seed.is_integer() || seed.as_integer()->get() < 0)
      fail("{}: seeds must be integers >= 0, got {}", where, value_text(seed));
    const auto value = static_cast<uint64_t>(seed.as_integer()->get());
    if (std::find(study.seeds.begin(), study.seeds.end(), value) != study.seeds.end())
      fail("{}: seed {} is listed twice", where, value);
    study.seeds.push_back(value);
  }
  study.out_dir = out_dir.empty() ? fs::path(get_string(*s, "out_dir", where, "runs/studies/" + study.name)) : out_dir;
  if (study.out_dir.empty()) fail("{}: out_dir must not be empty", where);
  study.eval_batches = get_count(*s, "eval_batches", where, study.eval_batches);
  study.permutations = get_count(*s, "permutations", where, study.permutations);
  study.similarity_tokens = get_count(*s, "similarity_tokens", where, study.similarity_tokens);

  // [train]
  std::vector<std::string> shared_needs;
  if (const toml::node* train = doc.get("train")) {
    if (!train->is_table()) fail("{}: train must be a table of moe-train options", source);
    shared_needs = check_options(*train->as_table(), source + " [train]");
    study.train = toml_text(*train->as_table());
  }

  // [[condition]]
  const toml::array* conditions = doc.get_as<toml::array>("condition");
  if (!conditions || conditions->empty() || !conditions->is_array_of_tables())
    fail("{}: no [[condition]] tables (each with a name and its options)", source);
  for (const toml::node& node : *conditions) {
    const toml::table& c = *node.as_table();
    const std::string number = fmt::format("{} [condition {}]", source, study.conditions.size() + 1);
    StudyCondition condition;
    condition.name = get_string(c, "name", number, "");
    if (!is_valid_name(condition.name))
      fail("{}: name must be made of [A-Za-z0-9_.-], got '{}'", number, condition.name);
    const std::string at = fmt::format("{} [condition {}]", source, condition.name);
    for (const StudyCondition& earlier : study.conditions)
      if (earlier.name == condition.name) fail("{}: the name is used by an earlier condition too", at);
    check_keys(c, {"name", "options", "table"}, at);
    if (const toml::node* table = c.get("table")) {
      if (!table->is_boolean()) fail("{}: table must be true or false, got {}", at, value_text(*table));
      condition.table = table->as_boolean()->get();
    }
    condition.needs = shared_needs;
    if (const toml::node* options = c.get("options")) {
      if (!options->is_table()) fail("{}: options must be a table, e.g. {{ moe.beta = 0.01 }}", at);
      for (const std::string& name : check_options(*options->as_table(), at))
        if (std::find(condition.needs.begin(), condition.needs.end(), name) == condition.needs.end())
          condition.needs.push_back(name);
      condition.options = toml_text(*options->as_table());
    }
    // "@name" must name an earlier condition: the runs of one seed go in file order.
    for (const std::string& name : condition.needs) {
      if (name == condition.name) fail("{}: '@{}' refers to the condition itself", at, name);
      const bool earlier = std::any_of(study.conditions.begin(), study.conditions.end(),
                                       [&](const StudyCondition& e) { return e.name == name; });
      if (earlier) continue;
      const bool later = std::any_of(conditions->begin(), conditions->end(), [&](const toml::node& n) {
        return get_string(*n.as_table(), "name", "", "") == name;
      });
      if (later)
        fail("{}: '@{}' refers to a later condition; conditions run in file order, so move '{}' above this one", at,
             name, name);
      std::vector<std::string> names;
      for (const toml::node& n : *conditions) names.push_back(get_string(*n.as_table(), "name", "", ""));
      fail("{}: '@{}' names no condition (conditions: {})", at, name, fmt::join(names, ", "));
    }
    study.conditions.push_back(std::move(condition));
  }
  if (study.table_conditions().empty()) fail("{}: every condition has table = false: nothing to compare", source);
  study.reference = get_string(*s, "reference", where, study.table_conditions().front()->name);
  const auto reference = std::find_if(study.conditions.begin(), study.conditions.end(),
                                      [&](const StudyCondition& c) { return c.name == study.reference; });
  if (reference == study.conditions.end()) fail("{}: reference '{}' names no condition", where, study.reference);
  if (!reference->table)
    fail("{}: reference '{}' has table = false; it must be a row of the results", where, study.reference);
  return study;
}

Study load_study(const fs::path& file, const fs::path& out_dir) {
  Study study = parse_study(data::read_file(file), file.filename().string(), out_dir);
  study.file = file;
  return study;
}

std::vector<StudyRun> resolve_runs(const Study& study) {
  std::vector<StudyRun> runs;
  std::map<std::pair<std::string, uint64_t>, size_t> index;  // (condition, seed) -> run
  for (uint64_t seed : study.seeds) {
    for (size_t c = 0; c < study.conditions.size(); ++c) {
      const StudyCondition& condition = study.conditions[c];
      const std::string where = fmt::format("{} [condition {}]", study.source, condition.name);
      StudyRun run;
      run.condition = c;
      run.seed = seed;
      run.dir = run_dir(study, condition.name, seed);
      run.label = fmt::format("{} seed {}", condition.name, seed);
      std::map<std::string, std::string> written;  // option key -> "@name" as the file wrote it
      auto apply = [&](const std::string& text, const std::string& source) {
        toml::table options;
        try {
          options = toml::parse(text, source);  // our own reprint of the file's table
        } catch (const toml::parse_error& e) {
          fail("{}: cannot read back the options ({}):\n{}", source, e.description(), text);
        }
        substitute_references(options, [&](const std::string& key, const std::string& name) {
          written[key] = "@" + name;
          return run_dir(study, name, seed).string();
        });
        apply_toml(run.config, toml_text(options), source);
      };
      run.config = train_preset(study.preset);
      apply(study.train, study.source + " [train]");
      apply(condition.options, where);
      run.config.seed = seed;
      run.config.out_dir = run.dir.string();
      run.config.validate(where);
      run.identity = json(run.config);
      run.identity.erase("train.out_dir");
      run.identity.erase("train.resume");
      for (const auto& [key, value] : written) run.identity[key] = value;
      for (const std::string& name : condition.needs) run.needs.push_back(index.at({name, seed}));
      index[{condition.name, seed}] = runs.size();
      runs.push_back(std::move(run));
    }
  }
  return runs;
}

std::vector<std::string> options_differing_from_preset(const Study& study, const TrainConfig& config) {
  const json preset = train_preset(study.preset), now = config;
  std::vector<std::string> out;
  for (const auto& [key, value] : now.items())
    if (key != "train.out_dir" && key != "train.seed" && (!preset.contains(key) || preset[key] != value))
      out.push_back(fmt::format("{} = {}", key, value.dump()));
  return out;
}

std::string first_difference(const json& stored, const json& now, const Study& study) {
  const json preset = train_preset(study.preset);
  for (const auto& [key, value] : now.items()) {
    if (!stored.contains(key)) {
      if (preset.contains(key) && preset[key] == value) continue;  // an option moe-train gained since, at its default
      return fmt::format("{}: not set then, now {}", key, value.dump());
    }
    if (stored[key] != value) return fmt::format("{}: was {}, now {}", key, stored[key].dump(), value.dump());
  }
  for (const auto& [key, value] : stored.items())
    if (!now.contains(key)) return fmt::format("{}: was {}, now not an option", key, value.dump());
  return "";
}

}  // namespace moelab::apps
