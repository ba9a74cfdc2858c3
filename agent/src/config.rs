//! Configuration layers around the command line: every long option of a clap command is also
//! an environment variable `TRACER_AGENT_<OPTION>` and a key `<option>` of a TOML config file
//! (`--config PATH` or `TRACER_AGENT_CONFIG`). Precedence: flag > variable > file > default.
//!
//! Nothing here names an option: the layers are derived from the command itself, so options
//! added later (flattened `#[command(flatten)]` groups too) get their variable and key for free.
//! Variables and file values are checked with the option's own value parser, then handed to
//! clap as if they had been typed before the real arguments, so `required`, conflicts and
//! defaults work as for flags. A lower layer's value is dropped when a higher layer set the
//! same option or one it conflicts with (a file's `all = true` yields to `--pid 1`).
//!
//! Keys use the option's spelling, dashes included (`otlp-endpoint = "http://..."`); lists are
//! TOML arrays (`pid = [1, 2]`) or, in a variable, comma-separated (`TRACER_AGENT_PID=1,2`);
//! switches are `true`/`false` (variables also take 1/0, yes/no, on/off). Empty variables
//! count as unset. [`Effective::to_toml`] prints the result with each value's origin.

use std::{
    any::TypeId,
    collections::BTreeMap,
    ffi::OsString,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{
    Arg, ArgAction, Command, CommandFactory, FromArgMatches,
    builder::{BoolishValueParser, Resettable, TypedValueParser as _},
    error::{ContextKind, ContextValue},
    parser::ValueSource,
};
use toml::Spanned;

/// Prefix of the environment variable of every option.
pub const ENV_PREFIX: &str = "TRACER_AGENT_";
/// The option naming the config file; it has its own variable and is not a key.
pub const CONFIG_OPTION: &str = "config";
/// The option that prints the configuration; only a flag.
pub const PRINT_CONFIG_OPTION: &str = "print-config";

/// `TRACER_AGENT_<OPTION>` for an option's long name (`otlp-endpoint` ->
/// `TRACER_AGENT_OTLP_ENDPOINT`).
pub fn env_var(long: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        long.to_ascii_uppercase().replace('-', "_")
    )
}

/// Why the configuration could not be assembled. Each message names the place to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {} is not valid TOML: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}:{line}: unknown key `{key}`{hint}", path.display())]
    UnknownKey {
        path: PathBuf,
        line: usize,
        key: String,
        /// "; did you mean ...?" or the list of valid keys.
        hint: String,
    },
    #[error("{}:{line}: `{key}` must be {expected}, not {found}", path.display())]
    WrongType {
        path: PathBuf,
        line: usize,
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("{origin}: invalid value {value:?} for `{key}`: {reason}")]
    InvalidValue {
        /// `FILE:LINE` or the variable's name.
        origin: String,
        key: String,
        value: String,
        reason: String,
    },
    /// What clap said about the final command line (including `--help` and `--version`,
    /// which are "errors" that exit 0); `note` says which values came from the layers.
    #[error("{error}{}", note.as_deref().map(|n| format!("\n{n}")).unwrap_or_default())]
    Cli {
        error: clap::Error,
        note: Option<String>,
    },
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The command line, as `--<option>`.
    Flag,
    /// This environment variable.
    Env(String),
    /// This line of this config file.
    File { path: PathBuf, line: usize },
    /// The built-in default (or unset).
    Default,
}

impl Source {
    fn describe(&self, long: &str) -> String {
        match self {
            Source::Flag => format!("--{long}"),
            Source::Env(var) => var.clone(),
            Source::File { path, line } => format!("{}:{line}", path.display()),
            Source::Default => "default".to_owned(),
        }
    }
}

/// A value of one layer for one option, checked but not applied yet.
#[derive(Clone, Debug, PartialEq)]
enum Setting {
    /// A switch (`--all`) on or off.
    Switch(bool),
    /// An option whose value is optional (`--dump`), given without one.
    Bare,
    /// A counted flag given this many times.
    Count(u8),
    Values(Vec<String>),
}

#[derive(Clone, Debug)]
struct Layered {
    long: String,
    setting: Setting,
    source: Source,
}

/// The parsed command and how its configuration came together.
#[derive(Debug)]
pub struct Loaded<T> {
    pub value: T,
    pub effective: Effective,
}

/// The effective configuration, for `--print-config`.
#[derive(Clone, Debug, Default)]
pub struct Effective {
    pub entries: Vec<Entry>,
    /// The config file read, and what named it.
    pub file: Option<(PathBuf, Source)>,
}

/// One option's effective value.
#[derive(Clone, Debug)]
pub struct Entry {
    pub key: String,
    /// Raw values as clap holds them; None when unset.
    pub values: Option<Vec<String>>,
    pub source: Source,
    /// Values of lower layers that yielded to this one (or to a conflicting option).
    pub overridden: Vec<String>,
    kind: Kind,
    multiple: bool,
    hidden: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bool,
    Number,
    Text,
}

fn kind_of(arg: &Arg) -> Kind {
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => return Kind::Bool,
        ArgAction::Count => return Kind::Number,
        _ => {}
    }
    let numeric = [
        TypeId::of::<u8>(),
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<usize>(),
        TypeId::of::<i8>(),
        TypeId::of::<i16>(),
        TypeId::of::<i32>(),
        TypeId::of::<i64>(),
        TypeId::of::<isize>(),
        TypeId::of::<f32>(),
        TypeId::of::<f64>(),
    ];
    let type_id = arg.get_value_parser().type_id();
    if numeric.iter().any(|id| type_id == *id) {
        Kind::Number
    } else {
        Kind::Text
    }
}

/// Options that the layers may set: every long option but help, version, `--config` and
/// `--print-config`.
fn configurable(cmd: &Command) -> impl Iterator<Item = (&Arg, &str)> {
    cmd.get_arguments().filter_map(|arg| {
        let long = arg.get_long()?;
        let plain = matches!(
            arg.get_action(),
            ArgAction::Set
                | ArgAction::Append
                | ArgAction::SetTrue
                | ArgAction::SetFalse
                | ArgAction::Count
        );
        (plain && long != CONFIG_OPTION && long != PRINT_CONFIG_OPTION).then_some((arg, long))
    })
}

fn takes_optional_value(arg: &Arg) -> bool {
    arg.get_num_args().is_some_and(|n| n.min_values() == 0)
}

/// Runs `arg`'s value parser on `value` alone; the reason when it refuses.
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    let probe = Arg::new("value")
        .long("value")
        .action(ArgAction::Set)
        .value_parser(arg.get_value_parser().clone());
    Command::new("check")
        .no_binary_name(true)
        .arg(probe)
        .try_get_matches_from([format!("--value={value}")])
        .map(drop)
        .map_err(|err| clap_reason(&err))
}

/// The part of a clap error that explains a refused value, without its usage lines.
fn clap_reason(err: &clap::Error) -> String {
    if let Some(source) = std::error::Error::source(err) {
        return source.to_string();
    }
    if let Some(ContextValue::Strings(valid)) = err.get(ContextKind::ValidValue) {
        return format!("expected one of {}", valid.join(", "));
    }
    let text = err.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.trim_start_matches("error: ").to_owned()
}

/// The value of an environment variable for `arg`.
fn env_setting(arg: &Arg, long: &str, var: &str, raw: &str) -> Result<Setting, ConfigError> {
    let invalid_value = |value: &str, reason: String| ConfigError::InvalidValue {
        origin: var.to_owned(),
        key: long.to_owned(),
        value: value.to_owned(),
        reason,
    };
    let invalid = |reason: String| invalid_value(raw, reason);
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => BoolishValueParser::new()
            .parse_ref(
                &Command::new("check"),
                None,
                std::ffi::OsStr::new(raw.trim()),
            )
            .map(Setting::Switch)
            .map_err(|_| invalid("expected true or false (or 1/0, yes/no, on/off)".to_owned())),
        ArgAction::Count => raw
            .trim()
            .parse()
            .map(Setting::Count)
            .map_err(|_| invalid("expected a count".to_owned())),
        action => {
            let values: Vec<String> = if matches!(action, ArgAction::Append) {
                raw.split(',').map(|v| v.trim().to_owned()).collect()
            } else {
                vec![raw.to_owned()]
            };
            for value in &values {
                check_value(arg, value).map_err(|reason| invalid_value(value, reason))?;
            }
            Ok(Setting::Values(values))
        }
    }
}

fn toml_type(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// A scalar as the text a flag would carry; None for arrays, tables and date-times.
fn scalar_text(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(_) | toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

/// Line (1-based) of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Levenshtein distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

fn unknown_key_hint(key: &str, known: &[&str]) -> String {
    let dashed = key.replace('_', "-");
    if known.contains(&dashed.as_str()) {
        return format!("; did you mean `{dashed}`? (keys are spelled like the options)");
    }
    if let Some(close) = known
        .iter()
        .filter(|k| distance(key, k) <= 2)
        .min_by_key(|k| distance(key, k))
    {
        return format!("; did you mean `{close}`?");
    }
    format!("; valid keys: {}", known.join(", "))
}

/// Reads and checks a config file against `cmd`'s options.
fn file_settings(cmd: &Command, path: &Path) -> Result<Vec<Layered>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let syntax = |message: String| ConfigError::Syntax {
        path: path.to_owned(),
        message: message.trim_end().to_owned(),
    };
    let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> =
        toml::from_str(&text).map_err(|err| syntax(err.to_string()))?;
    let mut entries: Vec<_> = table.into_iter().collect();
    // Report problems in the order of the file.
    entries.sort_by_key(|(key, _)| key.span().start);

    let args: BTreeMap<&str, &Arg> = configurable(cmd).map(|(arg, long)| (long, arg)).collect();
    let mut settings = Vec::new();
    for (key, value) in entries {
        let line = line_of(&text, key.span().start);
        let key = key.into_inner();
        let Some(arg) = args.get(key.as_str()) else {
            let known: Vec<&str> = args.keys().copied().collect();
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                line,
                hint: unknown_key_hint(&key, &known),
                key,
            });
        };
        let value = value.into_inner();
        let wrong_type = |expected| ConfigError::WrongType {
            path: path.to_owned(),
            line,
            key: key.clone(),
            expected,
            found: match &value {
                toml::Value::Array(items) => {
                    match items.iter().find(|i| scalar_text(i).is_none()) {
                        Some(inner) => format!("an array holding {}", toml_type(inner)),
                        None => "an array".to_owned(),
                    }
                }
                other => toml_type(other).to_owned(),
            },
        };
        let setting = match (arg.get_action(), &value) {
            (ArgAction::SetTrue | ArgAction::SetFalse, toml::Value::Boolean(on)) => {
                Setting::Switch(*on)
            }
            (ArgAction::SetTrue | ArgAction::SetFalse, _) => {
                return Err(wrong_type("true or false"));
            }
            (ArgAction::Count, toml::Value::Integer(n)) => {
                Setting::Count(u8::try_from(*n).map_err(|_| wrong_type("a count from 0 to 255"))?)
            }
            (ArgAction::Count, _) => return Err(wrong_type("a count")),
            // `dump = true` is `--dump` with its default value; false leaves it off.
            (_, toml::Value::Boolean(true)) if takes_optional_value(arg) => Setting::Bare,
            (_, toml::Value::Boolean(false)) if takes_optional_value(arg) => Setting::Switch(false),
            (action, value) => {
                let values = match value {
                    toml::Value::Array(items) if matches!(action, ArgAction::Append) => items
                        .iter()
                        .map(scalar_text)
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| wrong_type("an array of plain values"))?,
                    _ if matches!(action, ArgAction::Append) => {
                        vec![scalar_text(value).ok_or_else(|| wrong_type("a value or an array"))?]
                    }
                    _ => vec![scalar_text(value).ok_or_else(|| wrong_type("a single value"))?],
                };
                for text in &values {
                    check_value(arg, text).map_err(|reason| ConfigError::InvalidValue {
                        origin: format!("{}:{line}", path.display()),
                        key: key.clone(),
                        value: text.clone(),
                        reason,
                    })?;
                }
                Setting::Values(values)
            }
        };
        settings.push(Layered {
            long: key,
            setting,
            source: Source::File {
                path: path.to_owned(),
                line,
            },
        });
    }
    Ok(settings)
}

/// The arguments a setting stands for, as if typed.
fn as_args(long: &str, setting: &Setting) -> Vec<String> {
    match setting {
        Setting::Switch(true) | Setting::Bare => vec![format!("--{long}")],
        Setting::Switch(false) => Vec::new(),
        Setting::Count(n) => vec![format!("--{long}"); usize::from(*n)],
        Setting::Values(values) => values.iter().map(|v| format!("--{long}={v}")).collect(),
    }
}

/// Whether options `a` and `b` exclude each other (declared on either side).
fn conflicting(cmd: &Command, a: &Arg, b: &Arg) -> bool {
    let names = |x: &Arg, y: &Arg| {
        cmd.get_arg_conflicts_with(x)
            .iter()
            .any(|c| c.get_id() == y.get_id())
    };
    names(a, b) || names(b, a)
}

/// Parses `args` (the program name first) into `T`, with the environment (read through
/// `env`) and the config file as lower layers. `--help`, `--version` and command-line
/// mistakes come back as [`ConfigError::Cli`].
pub fn load<T: CommandFactory + FromArgMatches>(
    args: Vec<OsString>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded<T>, ConfigError> {
    let cmd = T::command();
    let cli_error = |error: clap::Error| ConfigError::Cli { error, note: None };
    // First pass: which options the command line sets. A command line clap rejects outright
    // (`--help` too) gets no layers: the final parse reports it.
    let Ok(first) = cmd.clone().ignore_errors(true).try_get_matches_from(&args) else {
        let matches = cmd.try_get_matches_from(&args).map_err(cli_error)?;
        let value = T::from_arg_matches(&matches).map_err(cli_error)?;
        return Ok(Loaded {
            value,
            effective: Effective::default(),
        });
    };
    let by_long: BTreeMap<&str, &Arg> = cmd
        .get_arguments()
        .filter_map(|arg| Some((arg.get_long()?, arg)))
        .collect();
    let explicit = |arg: &Arg| {
        matches!(
            first.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let from_command_line = |long: &str| {
        by_long.get(long).is_some_and(|arg| {
            first.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine)
        })
    };
    let raw = |long: &str| {
        by_long.get(long).and_then(|arg| {
            first
                .get_raw(arg.get_id().as_str())
                .and_then(|mut values| values.next())
                .map(|value| value.to_string_lossy().into_owned())
        })
    };

    let file = match raw(CONFIG_OPTION).filter(|_| from_command_line(CONFIG_OPTION)) {
        Some(path) => Some((PathBuf::from(path), Source::Flag)),
        None => {
            let var = env_var(CONFIG_OPTION);
            env(&var)
                .filter(|path| !path.is_empty())
                .map(|path| (PathBuf::from(path), Source::Env(var)))
        }
    };

    let mut env_layer = Vec::new();
    for (arg, long) in configurable(&cmd) {
        // An option with its own `env` is read by clap itself.
        if arg.get_env().is_some() {
            continue;
        }
        let var = env_var(long);
        if let Some(raw) = env(&var).filter(|v| !v.trim().is_empty()) {
            env_layer.push(Layered {
                long: long.to_owned(),
                setting: env_setting(arg, long, &var, &raw)?,
                source: Source::Env(var),
            });
        }
    }
    let file_layer = match &file {
        Some((path, _)) => file_settings(&cmd, path)?,
        None => Vec::new(),
    };

    // Apply the layers top down; an option set above (or one it conflicts with) wins.
    let mut set: Vec<&Arg> = cmd.get_arguments().filter(|a| explicit(a)).collect();
    let mut applied: Vec<Layered> = Vec::new();
    let mut overridden: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for layer in [env_layer, file_layer] {
        let mut this_layer = Vec::new();
        for item in layer {
            let arg = by_long[item.long.as_str()];
            let winner = set
                .iter()
                .find(|other| other.get_id() == arg.get_id() || conflicting(&cmd, arg, other));
            match winner {
                Some(other) => {
                    let other_long = other.get_long().unwrap_or_default();
                    let what = if other.get_id() == arg.get_id() {
                        "overridden".to_owned()
                    } else {
                        format!("dropped: conflicts with `{other_long}`")
                    };
                    overridden
                        .entry(other_long.to_owned())
                        .or_default()
                        .push(format!(
                            "{} = {} from {} ({what})",
                            item.long,
                            setting_text(&item.setting),
                            item.source.describe(&item.long)
                        ));
                }
                None => {
                    this_layer.push(arg);
                    applied.push(item);
                }
            }
        }
        set.extend(this_layer);
    }

    let print_config = from_command_line(PRINT_CONFIG_OPTION);
    let mut final_cmd = cmd.clone();
    if print_config {
        // Printing needs no target: an incomplete configuration is worth seeing too.
        final_cmd = final_cmd.mut_args(|arg| {
            arg.required(false)
                .required_unless_present(Resettable::Reset)
        });
    }
    let mut final_args: Vec<OsString> = args.iter().take(1).cloned().collect();
    for item in &applied {
        final_args.extend(
            as_args(&item.long, &item.setting)
                .into_iter()
                .map(Into::into),
        );
    }
    final_args.extend(args.iter().skip(1).cloned());
    let with_note = |error: clap::Error| {
        let note = (!applied.is_empty()).then(|| {
            let origins: Vec<String> = applied
                .iter()
                .map(|item| format!("--{} ({})", item.long, item.source.describe(&item.long)))
                .collect();
            format!(
                "note: these options came from the environment or the config file: {}",
                origins.join(", ")
            )
        });
        ConfigError::Cli { error, note }
    };
    let matches = final_cmd
        .try_get_matches_from(&final_args)
        .map_err(with_note)?;
    let value = T::from_arg_matches(&matches).map_err(with_note)?;

    let sources: BTreeMap<&str, &Source> = applied
        .iter()
        .map(|item| (item.long.as_str(), &item.source))
        .collect();
    let entries = configurable(&cmd)
        .map(|(arg, long)| {
            let id = arg.get_id().as_str();
            let source = match sources.get(long) {
                Some(source) => (*source).clone(),
                None => match matches.value_source(id) {
                    Some(ValueSource::CommandLine) => Source::Flag,
                    Some(ValueSource::EnvVariable) => Source::Env(
                        arg.get_env()
                            .map(|v| v.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    ),
                    _ => Source::Default,
                },
            };
            Entry {
                key: long.to_owned(),
                values: matches.get_raw(id).map(|values| {
                    values
                        .map(|v| v.to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                }),
                source,
                overridden: overridden.remove(long).unwrap_or_default(),
                kind: kind_of(arg),
                multiple: matches!(arg.get_action(), ArgAction::Append),
                hidden: arg.is_hide_set(),
            }
        })
        .collect();
    Ok(Loaded {
        value,
        effective: Effective { entries, file },
    })
}

fn setting_text(setting: &Setting) -> String {
    match setting {
        Setting::Switch(on) => on.to_string(),
        Setting::Bare => "true".to_owned(),
        Setting::Count(n) => n.to_string(),
        Setting::Values(values) => values.join(","),
    }
}

impl Entry {
    /// The value as TOML (None when unset).
    fn toml_value(&self) -> Option<String> {
        let values = self.values.as_ref()?;
        let one = |raw: &String| match self.kind {
            Kind::Bool if raw == "true" || raw == "false" => raw.clone(),
            Kind::Number if raw.parse::<f64>().is_ok_and(f64::is_finite) => raw.clone(),
            _ => toml::Value::String(raw.clone()).to_string(),
        };
        Some(if self.multiple {
            format!(
                "[{}]",
                values.iter().map(one).collect::<Vec<_>>().join(", ")
            )
        } else {
            values.first().map(one).unwrap_or_default()
        })
    }
}

impl Effective {
    /// The configuration as a TOML config file, each value commented with its origin.
    /// `fallbacks` lists, per key, the variables read when the option is unset (the
    /// OpenTelemetry ones); `env` reads them, to show which applies.
    pub fn to_toml(
        &self,
        fallbacks: &[(&str, &[&str])],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Effective configuration of {} {}.\n# Precedence: flag > {ENV_PREFIX}<OPTION> \
             variable > config file > default. Usable as a --config file.",
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION")
        );
        match &self.file {
            Some((path, source)) => {
                let _ = writeln!(
                    out,
                    "# Config file: {} (from {})",
                    path.display(),
                    source.describe(CONFIG_OPTION)
                );
            }
            None => {
                let _ = writeln!(out, "# Config file: none");
            }
        }
        for entry in &self.entries {
            if entry.hidden && entry.source == Source::Default {
                continue;
            }
            let line = match entry.toml_value() {
                Some(value) => format!("{} = {value}", entry.key),
                None => format!("# {} is not set", entry.key),
            };
            let mut origin = entry.source.describe(&entry.key);
            if entry.values.is_none() {
                origin = fallbacks
                    .iter()
                    .find(|(key, _)| *key == entry.key)
                    .map(|(_, vars)| {
                        let used = vars
                            .iter()
                            .find_map(|var| env(var).filter(|v| !v.is_empty()).map(|v| (var, v)));
                        match used {
                            Some((var, value)) => format!("{var}={value:?} applies"),
                            None => format!("falls back to {} (unset)", vars.join(", ")),
                        }
                    })
                    .unwrap_or_default();
            }
            if origin.is_empty() {
                let _ = writeln!(out, "{line}");
            } else {
                let _ = writeln!(out, "{line:<40} # {origin}");
            }
            for note in &entry.overridden {
                let _ = writeln!(out, "#   not applied: {note}");
            }
        }
        out
    }
}

/// A duration with its unit: `250ms`, `1.5s`, `2m`; units ns, us, ms, s, m, h (the value
/// parser of duration options).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 250ms or 1.5s"))?;
    let nanos_per_unit: f64 = match unit.trim() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" | "min" => 60e9,
        "h" => 3600e9,
        "" => {
            return Err(format!(
                "{text:?} has no unit; write e.g. {number}ms or {number}s"
            ));
        }
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use ns, us, ms, s, m or h"
            ));
        }
    };
    let nanos = (value * nanos_per_unit).round();
    if !nanos.is_finite() || nanos > u64::MAX as f64 {
        return Err(format!("{text:?} is too long"));
    }
    Ok(Duration::from_nanos(nanos as u64))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::Parser;

    use super::*;

    /// A stand-in for the agent's command line with every kind of option, and a flattened
    /// group like the ones other modules add.
    #[derive(Parser, Debug)]
    #[command(name = "agent")]
    struct TestCli {
        #[arg(long = "pid", required_unless_present = "all")]
        pids: Vec<u32>,
        #[arg(long, conflicts_with = "pids")]
        all: bool,
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=65536))]
        capture_limit: u32,
        #[arg(long)]
        otlp_endpoint: Option<String>,
        #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "text", require_equals = true)]
        dump: Option<Format>,
        #[arg(long, value_parser = parse_duration)]
        keep_slower_than: Option<Duration>,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        print_config: bool,
        #[command(flatten)]
        selection: Selection,
    }

    #[derive(clap::Args, Debug)]
    struct Selection {
        #[arg(long = "exe")]
        exes: Vec<String>,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
    enum Format {
        Text,
        Json,
    }

    fn config_file(text: &str) -> tempfile_like::File {
        tempfile_like::File::new(text)
    }

    /// A file removed on drop (no extra crate for it).
    mod tempfile_like {
        use std::{
            path::{Path, PathBuf},
            sync::atomic::{AtomicU32, Ordering},
        };

        pub struct File(PathBuf);

        impl File {
            pub fn new(text: &str) -> Self {
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "tracer-config-test-{}-{}.toml",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&path, text).expect("write test config");
                Self(path)
            }

            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for File {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Loaded<TestCli>, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let args = std::iter::once("agent")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        load::<TestCli>(args, &|key| env.get(key).cloned())
    }

    fn ok(args: &[&str], env: &[(&str, &str)]) -> Loaded<TestCli> {
        run(args, env).unwrap_or_else(|err| panic!("{args:?} {env:?}: {err}"))
    }

    fn err(args: &[&str], env: &[(&str, &str)]) -> String {
        match run(args, env) {
            Ok(loaded) => panic!("{args:?} {env:?} was accepted: {:?}", loaded.value),
            Err(err) => err.to_string(),
        }
    }

    fn source(loaded: &Loaded<TestCli>, key: &str) -> Source {
        loaded
            .effective
            .entries
            .iter()
            .find(|e| e.key == key)
            .unwrap_or_else(|| panic!("no entry {key}"))
            .source
            .clone()
    }

    #[test]
    fn env_names() {
        assert_eq!(env_var("otlp-endpoint"), "TRACER_AGENT_OTLP_ENDPOINT");
        assert_eq!(env_var("pid"), "TRACER_AGENT_PID");
    }

    #[test]
    fn precedence_is_flag_env_file_default() {
        let file = config_file("capture-limit = 1000\notlp-endpoint = \"http://file:4318\"\n");
        let path = file.path().to_str().unwrap();
        let layers = [
            ("TRACER_AGENT_CONFIG", path),
            ("TRACER_AGENT_CAPTURE_LIMIT", "2000"),
        ];

        // Default only.
        let loaded = ok(&["--all"], &[]);
        assert_eq!(loaded.value.capture_limit, 4096);
        assert_eq!(source(&loaded, "capture-limit"), Source::Default);

        // File over default.
        let loaded = ok(&["--all", "--config", path], &[]);
        assert_eq!(loaded.value.capture_limit, 1000);
        assert_eq!(
            source(&loaded, "capture-limit"),
            Source::File {
                path: file.path().to_owned(),
                line: 1
            }
        );
        assert_eq!(
            loaded.value.otlp_endpoint.as_deref(),
            Some("http://file:4318")
        );

        // Environment over file (the file named by its variable).
        let loaded = ok(&["--all"], &layers);
        assert_eq!(loaded.value.capture_limit, 2000);
        assert_eq!(
            source(&loaded, "capture-limit"),
            Source::Env("TRACER_AGENT_CAPTURE_LIMIT".into())
        );
        assert_eq!(
            loaded.value.otlp_endpoint.as_deref(),
            Some("http://file:4318"),
            "the file still fills what the environment leaves unset"
        );

        // Flag over environment and file.
        let loaded = ok(&["--all", "--capture-limit", "3000"], &layers);
        assert_eq!(loaded.value.capture_limit, 3000);
        assert_eq!(source(&loaded, "capture-limit"), Source::Flag);
        let entry = loaded
            .effective
            .entries
            .iter()
            .find(|e| e.key == "capture-limit")
            .unwrap();
        assert_eq!(entry.overridden.len(), 2, "{:?}", entry.overridden);

        // --config beats TRACER_AGENT_CONFIG.
        let other = config_file("capture-limit = 1234\n");
        let loaded = ok(
            &["--all", "--config", other.path().to_str().unwrap()],
            &[("TRACER_AGENT_CONFIG", path)],
        );
        assert_eq!(loaded.value.capture_limit, 1234);
    }

    #[test]
    fn layers_satisfy_requirements_and_yield_to_conflicting_flags() {
        // The target may come from the file alone.
        let file = config_file("all = true\n");
        let path = file.path().to_str().unwrap();
        let loaded = ok(&["--config", path], &[]);
        assert!(loaded.value.all);
        // A flag that conflicts with the file's value wins over it.
        let loaded = ok(&["--config", path, "--pid", "7"], &[]);
        assert!(!loaded.value.all);
        assert_eq!(loaded.value.pids, [7]);
        let pid = loaded
            .effective
            .entries
            .iter()
            .find(|e| e.key == "pid")
            .unwrap();
        assert_eq!(pid.overridden.len(), 1, "{:?}", pid.overridden);
        assert!(
            pid.overridden[0].contains("conflicts"),
            "{:?}",
            pid.overridden
        );
        // So does a variable.
        let loaded = ok(&["--config", path], &[("TRACER_AGENT_PID", "7,8")]);
        assert!(!loaded.value.all);
        assert_eq!(loaded.value.pids, [7, 8]);
        // Conflicts within one layer are the user's to fix, and say where they came from.
        let both = config_file("all = true\npid = [1]\n");
        let message = err(&["--config", both.path().to_str().unwrap()], &[]);
        assert!(message.contains("cannot be used with"), "{message}");
        assert!(message.contains("config file"), "{message}");
    }

    #[test]
    fn every_kind_of_value_from_file_and_env() {
        let file = config_file(
            "pid = [1, 2]\ndump = true\nkeep-slower-than = \"250ms\"\nexe = \"nginx\"\n",
        );
        let loaded = ok(&["--config", file.path().to_str().unwrap()], &[]);
        assert_eq!(loaded.value.pids, [1, 2]);
        assert_eq!(loaded.value.dump, Some(Format::Text));
        assert_eq!(
            loaded.value.keep_slower_than,
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            loaded.value.selection.exes,
            ["nginx"],
            "flattened options too"
        );

        let loaded = ok(
            &[],
            &[
                ("TRACER_AGENT_ALL", "1"),
                ("TRACER_AGENT_DUMP", "json"),
                ("TRACER_AGENT_EXE", "nginx, python3"),
                ("TRACER_AGENT_OTLP_ENDPOINT", ""),
            ],
        );
        assert!(loaded.value.all);
        assert_eq!(loaded.value.dump, Some(Format::Json));
        assert_eq!(loaded.value.selection.exes, ["nginx", "python3"]);
        assert_eq!(loaded.value.otlp_endpoint, None, "empty counts as unset");
        // A switch turned off in a lower layer stays off.
        let loaded = ok(&["--pid", "1"], &[("TRACER_AGENT_ALL", "false")]);
        assert!(!loaded.value.all);
    }

    #[test]
    fn unknown_keys_are_named_with_file_and_line() {
        let file = config_file("capture-limit = 10\n\notlp_endpoint = \"x\"\n");
        let message = err(&["--all", "--config", file.path().to_str().unwrap()], &[]);
        let want = format!(
            "{}:3: unknown key `otlp_endpoint`; did you mean `otlp-endpoint`?",
            file.path().display()
        );
        assert!(message.starts_with(&want), "{message}");

        let file = config_file("captur-limit = 10\n");
        let message = err(&["--all", "--config", file.path().to_str().unwrap()], &[]);
        assert!(message.contains(":1: unknown key `captur-limit`; did you mean `capture-limit`?"));

        let file = config_file("[export]\nqueue = 5\n");
        let message = err(&["--all", "--config", file.path().to_str().unwrap()], &[]);
        assert!(message.contains(":1: unknown key `export`; valid keys: all, capture-limit"));
        // Neither the file's own option nor --print-config is a key.
        let file = config_file("config = \"other.toml\"\n");
        let message = err(&["--all", "--config", file.path().to_str().unwrap()], &[]);
        assert!(message.contains("unknown key `config`"), "{message}");
    }

    #[test]
    fn wrong_types_and_bad_values_are_named() {
        let cases = [
            (
                "all = \"yes\"\n",
                ":1: `all` must be true or false, not a string",
            ),
            (
                "pid = [[1]]\n",
                ":1: `pid` must be an array of plain values, not an array holding an array",
            ),
            (
                "otlp-endpoint = [\"a\"]\n",
                ":1: `otlp-endpoint` must be a single value, not an array",
            ),
            (
                "capture-limit = { a = 1 }\n",
                "`capture-limit` must be a single value, not a table",
            ),
            (
                "\ncapture-limit = 0\n",
                ":2: invalid value \"0\" for `capture-limit`: 0 is not in 1..=65536",
            ),
            (
                "capture-limit = \"lots\"\n",
                "invalid value \"lots\" for `capture-limit`: invalid digit",
            ),
            (
                "dump = \"xml\"\n",
                "invalid value \"xml\" for `dump`: expected one of text, json",
            ),
            (
                "keep-slower-than = \"250\"\n",
                "invalid value \"250\" for `keep-slower-than`: \"250\" has no unit",
            ),
            (
                "keep-slower-than = \"1 fortnight\"\n",
                "unknown unit \"fortnight\"",
            ),
        ];
        for (text, want) in cases {
            let file = config_file(text);
            let message = err(&["--all", "--config", file.path().to_str().unwrap()], &[]);
            assert!(message.contains(want), "{text:?}: {message}");
            assert!(
                message.starts_with(&file.path().display().to_string()),
                "{message}"
            );
        }

        let message = err(&["--all"], &[("TRACER_AGENT_CAPTURE_LIMIT", "lots")]);
        assert!(
            message.starts_with(
                "TRACER_AGENT_CAPTURE_LIMIT: invalid value \"lots\" for `capture-limit`"
            ),
            "{message}"
        );
        let message = err(&["--pid", "1"], &[("TRACER_AGENT_ALL", "maybe")]);
        assert!(message.contains("expected true or false"), "{message}");
        let message = err(&[], &[("TRACER_AGENT_PID", "1,x")]);
        assert!(
            message.contains("invalid value \"x\" for `pid`"),
            "{message}"
        );
    }

    #[test]
    fn missing_and_broken_files() {
        let message = err(&["--all", "--config", "/nonexistent/agent.toml"], &[]);
        assert!(
            message.starts_with("cannot read config file /nonexistent/agent.toml: No such file"),
            "{message}"
        );
        let message = err(
            &["--all"],
            &[("TRACER_AGENT_CONFIG", "/nonexistent/b.toml")],
        );
        assert!(message.contains("/nonexistent/b.toml"), "{message}");
        let file = config_file("capture-limit = \n");
        let message = err(&["--all", "--config", file.path().to_str().unwrap()], &[]);
        assert!(message.contains("is not valid TOML"), "{message}");
        assert!(message.contains("line 1"), "{message}");
        let file = config_file("all = true\nall = false\n");
        let message = err(&["--config", file.path().to_str().unwrap()], &[]);
        assert!(message.contains("duplicate key"), "{message}");
    }

    #[test]
    fn command_line_errors_stay_clap_errors() {
        assert!(matches!(
            run(&["--help"], &[]),
            Err(ConfigError::Cli { error, .. }) if error.kind() == clap::error::ErrorKind::DisplayHelp
        ));
        assert!(matches!(
            run(&["--all", "--bogus"], &[]),
            Err(ConfigError::Cli { error, .. }) if error.kind() == clap::error::ErrorKind::UnknownArgument
        ));
        assert!(matches!(run(&[], &[]), Err(ConfigError::Cli { .. })));
    }

    #[test]
    fn print_config_round_trips() {
        let file = config_file("capture-limit = 1000\ndump = \"json\"\n");
        let path = file.path().to_str().unwrap();
        let loaded = ok(
            &["--config", path, "--pid", "5", "--pid", "6"],
            &[("TRACER_AGENT_KEEP_SLOWER_THAN", "1.5s")],
        );
        let fallbacks: &[(&str, &[&str])] = &[("otlp-endpoint", &["OTEL_EXPORTER_OTLP_ENDPOINT"])];
        let text = loaded.effective.to_toml(fallbacks, &|_| None);
        for want in [
            "pid = [5, 6]",
            "# --pid",
            "capture-limit = 1000",
            &format!("# {path}:1"),
            "dump = \"json\"",
            "keep-slower-than = \"1.5s\"",
            "# TRACER_AGENT_KEEP_SLOWER_THAN",
            "all = false",
            "# otlp-endpoint is not set",
            "falls back to OTEL_EXPORTER_OTLP_ENDPOINT (unset)",
            &format!("# Config file: {path} (from --config)"),
        ] {
            assert!(text.contains(want), "no {want:?} in:\n{text}");
        }
        assert!(!text.contains("print-config ="), "{text}");
        let shown = loaded.effective.to_toml(fallbacks, &|key| {
            (key == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c:4318".to_owned())
        });
        assert!(
            shown.contains("OTEL_EXPORTER_OTLP_ENDPOINT=\"http://c:4318\" applies"),
            "{shown}"
        );

        // Fed back as the only source, it gives the same values.
        let again = config_file(&text);
        let reloaded = ok(&["--config", again.path().to_str().unwrap()], &[]);
        assert_eq!(reloaded.value.pids, [5, 6]);
        assert_eq!(reloaded.value.capture_limit, 1000);
        assert_eq!(reloaded.value.dump, Some(Format::Json));
        assert_eq!(
            reloaded.value.keep_slower_than,
            Some(Duration::from_millis(1500))
        );
        assert!(!reloaded.value.all);

        // Printing needs no target.
        let loaded = ok(&["--print-config"], &[]);
        assert!(loaded.value.print_config);
        assert!(loaded.value.pids.is_empty());
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("250ms"), Ok(ms(250)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(parse_duration(" 2 m "), Ok(ms(120_000)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "250", "ms", "-1s", "1.2.3s", "5 parsecs", "1e999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
