//! A container's output from the Docker engine, streamed: `docker logs` with its follow,
//! since, tail and timestamps options, each frame tagged stdout or stderr.

use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptionsBuilder;
use bollard::Docker;
use futures_util::StreamExt;

use super::{docker_err, is_not_found};
use crate::runtime::{LogChunk, LogOptions, LogStream, OutputStream};

/// The engine's `logs` options for `options`.
fn engine_options(options: &LogOptions) -> bollard::query_parameters::LogsOptions {
    let tail = options.tail.map_or("all".to_string(), |n| n.to_string());
    let since = options
        .since
        .map_or(0, |s| i32::try_from(s).unwrap_or(i32::MAX));
    LogsOptionsBuilder::new()
        .stdout(true)
        .stderr(true)
        .follow(options.follow)
        .timestamps(options.timestamps)
        .since(since)
        .tail(&tail)
        .build()
}

/// `id`'s output. A container that is missing (or removed while followed) ends the
/// stream rather than failing it: it has nothing more to say.
pub(super) fn stream(docker: &Docker, id: &str, options: &LogOptions) -> LogStream {
    docker
        .logs(id, Some(engine_options(options)))
        .take_while(|item| {
            let gone = matches!(item, Err(e) if is_not_found(e));
            std::future::ready(!gone)
        })
        .filter_map(|item| {
            std::future::ready(match item {
                Ok(LogOutput::StdErr { message }) => Some(Ok(LogChunk {
                    stream: OutputStream::Stderr,
                    data: message,
                })),
                Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                    Some(Ok(LogChunk {
                        stream: OutputStream::Stdout,
                        data: message,
                    }))
                }
                Ok(LogOutput::StdIn { .. }) => None,
                Err(e) => Some(Err(docker_err("container logs")(e))),
            })
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_tail_asks_for_all_and_a_tail_for_that_many_lines() {
        let all = engine_options(&LogOptions::default());
        assert_eq!(all.tail, "all");
        assert!(all.stdout && all.stderr && !all.follow);
        let some = engine_options(&LogOptions {
            follow: true,
            since: Some(1_700_000_000),
            tail: Some(100),
            timestamps: true,
        });
        assert_eq!(some.tail, "100");
        assert_eq!(some.since, 1_700_000_000);
        assert!(some.follow && some.timestamps);
    }
}
