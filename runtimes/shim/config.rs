//! The shim's settings: flags, each with an environment variable behind it (the flag wins),
//! so an image fixes them in its `CMD` and a manifest's `env` can change them without a
//! rebuild. Every bad value is reported at once, naming the flag, what was expected and
//! what was given.

use std::path::Path;
use std::time::Duration;

pub const USAGE: &str = "\
usage: ember-shim [OPTIONS] -- COMMAND [ARG...]

Serves HTTP on $PORT and runs COMMAND once per request: the body on its stdin, the
request in EMBER_METHOD, EMBER_PATH, EMBER_QUERY and EMBER_HEADER_<NAME>, its stdout as
the response. Exit code 0 answers 200; any other answers 500 with its stderr.
GET /healthz answers 200 without running anything.

Options (the environment variable in brackets is used when the flag is absent):
  --port N            listen on 0.0.0.0:N [PORT] (8080)
  --concurrency N     commands at once; one more request answers 429 [EMBER_SHIM_CONCURRENCY] (1)
  --timeout DUR       kill a command's process group after DUR, answer 504 [EMBER_SHIM_TIMEOUT] (300s)
  --max-body SIZE     larger request bodies answer 413 [EMBER_SHIM_MAX_BODY] (32MiB)
  --max-output SIZE   buffered output past SIZE kills the command, answers 500 [EMBER_SHIM_MAX_OUTPUT] (256MiB)
  --content-type T    the content type of the command's output [EMBER_SHIM_CONTENT_TYPE]
                      (application/octet-stream)
  --stream            send output as it is produced (chunked) instead of after the exit
                      [EMBER_SHIM_STREAM=1]
  --grace DUR         on SIGTERM, how long running commands may finish [EMBER_SHIM_GRACE] (10s)
  COMMAND             after `--` [EMBER_SHIM_COMMAND, split on spaces]

DUR: 500ms, 30s, 5m, 2h (a bare number is seconds). SIZE: 512KiB, 32MiB, 1GiB (or bytes).";

/// Everything the server needs to know, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub port: u16,
    pub concurrency: usize,
    pub timeout: Duration,
    pub max_body: u64,
    pub max_output: u64,
    pub content_type: String,
    pub stream: bool,
    pub grace: Duration,
    /// The program and its arguments.
    pub command: Vec<String>,
}

/// Where a setting comes from: the flag's value, else the environment's.
struct Source<'a> {
    flags: &'a [(String, String)],
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Source<'_> {
    fn get(&self, flag: &str, var: &str) -> Option<(String, String)> {
        let given = self.flags.iter().rev().find(|(f, _)| f == flag);
        match given {
            Some((_, v)) => Some((format!("--{flag}"), v.clone())),
            None => (self.env)(var).map(|v| (var.to_string(), v)),
        }
    }
}

impl Config {
    /// Reads the settings from `args` (without the program name) and `env`; on failure,
    /// every problem, one line each.
    pub fn parse(
        args: &[String],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let mut flags = Vec::new();
        let mut command = Vec::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--" => {
                    command = it.by_ref().cloned().collect();
                }
                "--stream" => flags.push(("stream".to_string(), "1".to_string())),
                // main answers these before parsing.
                "-h" | "--help" => {}
                flag if flag.starts_with("--") => {
                    let name = flag.trim_start_matches("--");
                    let (name, inline) = match name.split_once('=') {
                        Some((n, v)) => (n, Some(v.to_string())),
                        None => (name, None),
                    };
                    if !VALUED.contains(&name) {
                        errors.push(format!("{flag}: not an option (see --help)"));
                        continue;
                    }
                    match inline.or_else(|| it.next().cloned()) {
                        Some(v) => flags.push((name.to_string(), v)),
                        None => errors.push(format!("--{name}: needs a value")),
                    }
                }
                other => errors.push(format!(
                    "`{other}`: the command goes after `--`, e.g. `ember-shim -- /bin/sh /app/run.sh`"
                )),
            }
        }
        let src = Source { flags: &flags, env };
        let mut number = |flag: &str, var: &str, default: u64, min: u64, max: u64| -> u64 {
            match src.get(flag, var) {
                None => default,
                Some((from, v)) => match v.trim().parse::<u64>() {
                    Ok(n) if (min..=max).contains(&n) => n,
                    _ => {
                        errors.push(format!(
                            "{from}: expected a whole number from {min} to {max}, got `{v}`"
                        ));
                        default
                    }
                },
            }
        };
        let port = number("port", "PORT", 8080, 1, 65535) as u16;
        let concurrency = number("concurrency", "EMBER_SHIM_CONCURRENCY", 1, 1, 10_000) as usize;
        let mut setting =
            |flag: &str, var: &str, parse: fn(&str) -> Option<u64>, expected: &str| {
                src.get(flag, var).and_then(|(from, v)| {
                    let parsed = parse(v.trim()).filter(|n| *n > 0);
                    if parsed.is_none() {
                        errors.push(format!("{from}: expected {expected}, got `{v}`"));
                    }
                    parsed
                })
            };
        const DUR: &str = "a duration like 500ms, 30s, 5m or 2h";
        const SIZE: &str = "a size like 512KiB, 32MiB or 1GiB";
        let timeout =
            setting("timeout", "EMBER_SHIM_TIMEOUT", parse_millis, DUR).unwrap_or(300_000);
        let grace = setting("grace", "EMBER_SHIM_GRACE", parse_millis, DUR).unwrap_or(10_000);
        let max_body =
            setting("max-body", "EMBER_SHIM_MAX_BODY", parse_size, SIZE).unwrap_or(32 << 20);
        let max_output =
            setting("max-output", "EMBER_SHIM_MAX_OUTPUT", parse_size, SIZE).unwrap_or(256 << 20);
        let content_type = match src.get("content-type", "EMBER_SHIM_CONTENT_TYPE") {
            Some((from, v)) if v.is_empty() || v.chars().any(|c| c.is_control()) => {
                errors.push(format!(
                    "{from}: expected a media type like text/plain, got `{v}`"
                ));
                String::new()
            }
            Some((_, v)) => v,
            None => "application/octet-stream".to_string(),
        };
        let stream = match src.get("stream", "EMBER_SHIM_STREAM") {
            None => false,
            Some((_, v)) if ["1", "true", "yes"].contains(&v.as_str()) => true,
            Some((_, v)) if ["", "0", "false", "no"].contains(&v.as_str()) => false,
            Some((from, v)) => {
                errors.push(format!("{from}: expected 1 or 0, got `{v}`"));
                false
            }
        };
        if command.is_empty() {
            command = env("EMBER_SHIM_COMMAND")
                .map(|c| c.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default();
        }
        match command.first() {
            None => errors.push(
                "no command: give it after `--` (`ember-shim -- /bin/sh /app/run.sh`) or in EMBER_SHIM_COMMAND"
                    .to_string(),
            ),
            Some(program) => {
                if let Err(e) = check_program(program, env("PATH").as_deref()) {
                    errors.push(e);
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Config {
            port,
            concurrency,
            timeout: Duration::from_millis(timeout),
            max_body,
            max_output,
            content_type,
            stream,
            grace: Duration::from_millis(grace),
            command,
        })
    }
}

/// The flags that take a value.
const VALUED: &[&str] = &[
    "port",
    "concurrency",
    "timeout",
    "max-body",
    "max-output",
    "content-type",
    "grace",
];

/// A command that cannot run is a start-up error, not a 500 on every request.
fn check_program(program: &str, path: Option<&str>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        executable(Path::new(program))
    } else {
        path.unwrap_or("/usr/local/bin:/usr/bin:/bin")
            .split(':')
            .any(|dir| executable(&Path::new(dir).join(program)))
    };
    if found {
        Ok(())
    } else {
        Err(format!(
            "the command `{program}` is not an executable file{}; copy it into the image or fix the path",
            if program.contains('/') { "" } else { " on PATH" }
        ))
    }
}

/// A whole number followed by a unit (`30s`, `32MiB`), scaled by what `unit` says the
/// unit is worth; `None` for anything else.
fn scaled(text: &str, unit: fn(&str) -> Option<u64>) -> Option<u64> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    digits
        .parse::<u64>()
        .ok()?
        .checked_mul(unit(suffix.trim())?)
}

/// `500ms`, `30s`, `5m`, `2h` or a bare number of seconds, in milliseconds.
fn parse_millis(text: &str) -> Option<u64> {
    scaled(text, |unit| match unit {
        "ms" => Some(1),
        "" | "s" => Some(1_000),
        "m" => Some(60_000),
        "h" => Some(3_600_000),
        _ => None,
    })
}

/// `512KiB`, `32MiB`, `1GiB` (also `KB`, `MB`, `GB` as powers of 1024) or bytes.
fn parse_size(text: &str) -> Option<u64> {
    scaled(text, |unit| match unit.to_ascii_lowercase().as_str() {
        "" | "b" => Some(1),
        "k" | "kb" | "kib" => Some(1 << 10),
        "m" | "mb" | "mib" => Some(1 << 20),
        "g" | "gb" | "gib" => Some(1 << 30),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, Vec<String>> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(&args, &move |k: &str| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_suit_one_heavy_command_at_a_time() {
        let c = parse(&["--", "/bin/sh", "-c", "cat"], &[]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.concurrency, 1);
        assert_eq!(c.timeout, Duration::from_secs(300));
        assert_eq!(c.max_body, 32 << 20);
        assert!(!c.stream);
        assert_eq!(c.command, ["/bin/sh", "-c", "cat"]);
    }

    #[test]
    fn flags_win_over_the_environment() {
        let env = [
            ("PORT", "9000"),
            ("EMBER_SHIM_CONCURRENCY", "4"),
            ("EMBER_SHIM_TIMEOUT", "2m"),
        ];
        let c = parse(&["--concurrency=2", "--", "/bin/sh"], &env).unwrap();
        assert_eq!((c.port, c.concurrency), (9000, 2));
        assert_eq!(c.timeout, Duration::from_secs(120));
    }

    #[test]
    fn the_command_may_come_from_the_environment() {
        let c = parse(
            &["--stream"],
            &[("EMBER_SHIM_COMMAND", "/bin/sh  /app/run.sh")],
        )
        .unwrap();
        assert_eq!(c.command, ["/bin/sh", "/app/run.sh"]);
        assert!(c.stream);
    }

    #[test]
    fn every_bad_setting_is_named_with_what_was_expected() {
        let errors = parse(
            &["--timeout", "soon", "--max-body", "0", "--bogus", "x"],
            &[("EMBER_SHIM_CONCURRENCY", "none")],
        )
        .unwrap_err();
        let all = errors.join("\n");
        assert!(all.contains("--timeout: expected a duration"), "{all}");
        assert!(all.contains("--max-body: expected a size"), "{all}");
        assert!(
            all.contains("EMBER_SHIM_CONCURRENCY: expected a whole number"),
            "{all}"
        );
        assert!(all.contains("--bogus: not an option"), "{all}");
        assert!(all.contains("no command"), "{all}");
    }

    #[test]
    fn a_missing_program_is_refused_at_start() {
        let errors = parse(&["--", "/no/such/render"], &[]).unwrap_err();
        assert!(
            errors[0].contains("`/no/such/render` is not an executable file"),
            "{errors:?}"
        );
    }

    #[test]
    fn durations_and_sizes_read_like_the_manifest() {
        assert_eq!(parse_millis("500ms"), Some(500));
        assert_eq!(parse_millis("30"), Some(30_000));
        assert_eq!(parse_millis("5m"), Some(300_000));
        assert_eq!(parse_millis("5 weeks"), None);
        assert_eq!(parse_size("32MiB"), Some(32 << 20));
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("1.5GiB"), None);
    }
}
