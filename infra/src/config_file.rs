//! Configuration files for the services. Settings come, lowest first, from the
//! defaults, a TOML file (`--config FILE` or `SLUICE_CONFIG_FILE`), the `SLUICE_*`
//! environment variables and the command-line flags. The file's keys are the long flag
//! names (`database-url = "postgres://..."`, `signal-partitions = 24`, a list for a
//! repeatable flag); a key the binary does not have is a usage error, so a typo never
//! passes silently. The file's values are handed to the one flag parser as flags,
//! except where the environment or the command line already set them, so every
//! setting is validated once, the same way, whatever its origin.

use std::ffi::OsString;
use std::path::PathBuf;

/// Why a configuration file cannot be used; the process exits with EX_USAGE.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The file named by `--config FILE` / `--config=FILE` in `args` (which is removed),
/// else by SLUICE_CONFIG_FILE.
fn take_config_path(args: &mut Vec<OsString>) -> Option<PathBuf> {
    let mut found = None;
    let mut i = 1;
    while i < args.len() {
        let arg = args[i].to_string_lossy().into_owned();
        if arg == "--" {
            break;
        }
        if arg == "--config" && i + 1 < args.len() {
            found = Some(PathBuf::from(args.remove(i + 1)));
            args.remove(i);
            continue;
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            found = Some(PathBuf::from(path));
            args.remove(i);
            continue;
        }
        i += 1;
    }
    found.or_else(|| {
        std::env::var_os("SLUICE_CONFIG_FILE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// Adds the settings of the configuration file, if one is named, to `args` as flags of
/// the (sub)command that `args` runs. `command` is the binary's clap command.
pub fn apply(command: clap::Command, args: &mut Vec<OsString>) -> Result<(), ConfigFileError> {
    let Some(path) = take_config_path(args) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigFileError::Read {
        path: path.clone(),
        source,
    })?;
    let invalid = |message: String| ConfigFileError::Invalid {
        path: path.clone(),
        message,
    };
    let table: toml::Table = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;

    // The settings belong to the subcommand that runs (the deepest one named).
    let mut command = command;
    command.build();
    let mut insert_at = 1;
    let mut current = command.clone();
    for (i, arg) in args.iter().enumerate().skip(1) {
        let name = arg.to_string_lossy();
        if name.starts_with('-') {
            continue;
        }
        match current.find_subcommand(name.as_ref()) {
            Some(sub) => {
                let sub = sub.clone();
                current = sub;
                insert_at = i + 1;
            }
            None => break,
        }
    }

    let mut extra: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let Some(arg) = current
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
        else {
            // A setting of another subcommand (one file serves `serve` and `tokens`).
            if has_long(&command, key) {
                continue;
            }
            return Err(invalid(format!(
                "unknown setting {key:?} (settings are the long flag names of `{} --help`)",
                command.get_name()
            )));
        };
        let flag = format!("--{key}");
        let given = args.iter().any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        });
        let from_env = arg
            .get_env()
            .is_some_and(|env| std::env::var_os(env).is_some_and(|v| !v.is_empty()));
        if given || from_env {
            continue;
        }
        let values = match value {
            toml::Value::Array(items) => items.iter().collect::<Vec<_>>(),
            other => vec![other],
        };
        let takes_value = arg.get_action().takes_values();
        for v in values {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(invalid(format!(
                        "{key}: a {} is not a setting value (use a string, number, boolean or a list of them)",
                        other.type_str()
                    )))
                }
            };
            if takes_value {
                extra.push(format!("{flag}={text}").into());
            } else {
                match v {
                    toml::Value::Boolean(true) => extra.push(flag.clone().into()),
                    toml::Value::Boolean(false) => {}
                    _ => return Err(invalid(format!("{key}: expects true or false"))),
                }
            }
        }
    }
    args.splice(insert_at..insert_at, extra);
    Ok(())
}

/// Whether `command` or any of its subcommands has the flag `--long`.
fn has_long(command: &clap::Command, long: &str) -> bool {
    command.get_arguments().any(|a| a.get_long() == Some(long))
        || command.get_subcommands().any(|s| has_long(s, long))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[arg(long, env = "SLUICE_TEST_CF_URL")]
        url: String,
        #[arg(long, default_value_t = 4)]
        partitions: u32,
        #[arg(long = "property")]
        properties: Vec<String>,
        #[arg(long)]
        verbose: bool,
    }

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn file(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "sluice-config-{}-{}.toml",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).expect("temp file");
        path
    }

    #[test]
    fn the_file_fills_what_flags_leave_and_flags_win() {
        let path = file(
            "url = \"from-file\"\npartitions = 9\nproperty = [\"a=1\", \"b=2\"]\nverbose = true\n",
        );
        let mut argv = args(&[
            "bin",
            "--config",
            path.to_str().expect("utf-8"),
            "--partitions",
            "3",
        ]);
        apply(Cli::command(), &mut argv).expect("applies");
        let cli = Cli::try_parse_from(&argv).expect("parses");
        assert_eq!(cli.url, "from-file");
        assert_eq!(cli.partitions, 3, "the flag wins over the file");
        assert_eq!(cli.properties, ["a=1", "b=2"]);
        assert!(cli.verbose);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_naming_the_file() {
        let path = file("url = \"x\"\npartitons = 3\n");
        let mut argv = args(&["bin", &format!("--config={}", path.display())]);
        let err = apply(Cli::command(), &mut argv).expect_err("typo");
        assert!(
            err.to_string().contains("unknown setting \"partitons\""),
            "{err}"
        );
        let path = file("url = \"x\"\npartitions = \"many\"\n");
        let mut argv = args(&["bin", &format!("--config={}", path.display())]);
        apply(Cli::command(), &mut argv).expect("the file is well-formed");
        // The flag parser judges the value, as it judges a flag.
        assert!(Cli::try_parse_from(&argv).is_err());
        let path = file("url = \n");
        let mut argv = args(&["bin", &format!("--config={}", path.display())]);
        assert!(matches!(
            apply(Cli::command(), &mut argv),
            Err(ConfigFileError::Invalid { .. })
        ));
        let mut argv = args(&["bin", "--config", "/nonexistent/sluice.toml"]);
        assert!(matches!(
            apply(Cli::command(), &mut argv),
            Err(ConfigFileError::Read { .. })
        ));
    }
}
