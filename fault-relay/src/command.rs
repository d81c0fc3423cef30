//! The one-line text commands `ftrelay` takes on its control socket.
//!
//! ```text
//! [up|down|both] FAULT [ARGUMENTS] [on|after KIND]     (direction: both if not given)
//!   drop | dup | reorder | flip OFFSET [MASK]         the next frame (of KIND)
//!   rewrite OFFSET [MASK]        flip, then recompute the frame's CRCs
//!   delay DURATION                                    every frame (0 clears; 50ms, 1s, 200us)
//!   stall | resume                                    stop / go on
//!   reset | fin                                       at once, or after the next KIND frame
//! counters                                            one line of key=value counters
//! clear                                               no fault pending, no delay, no stall
//! ```
//! The direction may also follow the fault (`fin up`). KIND is a name
//! (`EpochEnd`, `pages`, `heartbeat`: see [`crate::fault::kind::NAMED`])
//! or a kind byte (`71`). MASK defaults to `0x01`.

use std::time::Duration;

use ft_link::FrameKind;

use crate::fault::{frame_kind_named, Direction, Fault};
use crate::relay::{RelayError, RelayHandle};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("empty command")]
    Empty,
    #[error("unknown command {0:?} (drop, dup, reorder, flip, rewrite, delay, stall, resume, reset, fin, counters, clear)")]
    Unknown(String),
    #[error("{command} needs {what}")]
    Missing {
        command: &'static str,
        what: &'static str,
    },
    #[error("{0:?} is not a frame kind (a name such as EpochEnd, or a kind byte)")]
    Kind(String),
    #[error("{0:?} is not a byte offset")]
    Offset(String),
    #[error("{0:?} is not a mask (1 to 0xff)")]
    Mask(String),
    #[error("{0:?} is not a duration (such as 50ms, 2s, 200us; a bare number is milliseconds)")]
    Duration(String),
    #[error("unexpected words {0:?}")]
    Extra(String),
    #[error("{0} takes no direction nor frame kind")]
    Plain(&'static str),
    #[error("more than one direction given")]
    TwoDirections,
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Inject {
        direction: Direction,
        fault: Fault,
        only: Option<FrameKind>,
    },
    Counters,
    Clear,
}

impl Command {
    pub fn parse(line: &str) -> Result<Command, CommandError> {
        let mut words: Vec<&str> = line.split_whitespace().collect();
        let mut direction = None;
        words.retain(|w| {
            let d = match w.to_ascii_lowercase().as_str() {
                "up" => Direction::Up,
                "down" => Direction::Down,
                "both" => Direction::Both,
                _ => return true,
            };
            direction = match direction {
                None => Some(Ok(d)),
                Some(_) => Some(Err(CommandError::TwoDirections)),
            };
            false
        });
        let direction = direction.transpose()?;
        let mut only = None;
        if let Some(at) = words
            .iter()
            .position(|w| matches!(w.to_ascii_lowercase().as_str(), "on" | "after"))
        {
            let kind = words.get(at + 1).ok_or(CommandError::Missing {
                command: "on/after",
                what: "a frame kind",
            })?;
            only =
                Some(frame_kind_named(kind).ok_or_else(|| CommandError::Kind(kind.to_string()))?);
            if words.len() > at + 2 {
                return Err(CommandError::Extra(words[at + 2..].join(" ")));
            }
            words.truncate(at);
        }
        let (verb, args) = words.split_first().ok_or(CommandError::Empty)?;
        let verb = verb.to_ascii_lowercase();
        let plain = |name: &'static str, command: Command| {
            if direction.is_some() || only.is_some() {
                Err(CommandError::Plain(name))
            } else {
                Ok(command)
            }
        };
        let fault = match verb.as_str() {
            "counters" => return no_args(args).and_then(|()| plain("counters", Command::Counters)),
            "clear" => return no_args(args).and_then(|()| plain("clear", Command::Clear)),
            "drop" => no_args(args).map(|()| Fault::Drop)?,
            "dup" | "duplicate" => no_args(args).map(|()| Fault::Duplicate)?,
            "reorder" => no_args(args).map(|()| Fault::Reorder)?,
            "stall" => no_args(args).map(|()| Fault::Stall)?,
            "resume" => no_args(args).map(|()| Fault::Resume)?,
            "reset" => no_args(args).map(|()| Fault::Reset)?,
            "fin" => no_args(args).map(|()| Fault::Fin)?,
            "delay" => match args {
                [d] => Fault::Delay(parse_duration(d)?),
                [] => {
                    return Err(CommandError::Missing {
                        command: "delay",
                        what: "a duration",
                    })
                }
                [_, rest @ ..] => return Err(CommandError::Extra(rest.join(" "))),
            },
            "flip" | "rewrite" => {
                let command = if verb == "flip" { "flip" } else { "rewrite" };
                let (offset, mask) = match args {
                    [o] => (*o, None),
                    [o, m] => (*o, Some(*m)),
                    [] => {
                        return Err(CommandError::Missing {
                            command,
                            what: "a byte offset",
                        })
                    }
                    [_, _, rest @ ..] => return Err(CommandError::Extra(rest.join(" "))),
                };
                let offset = offset
                    .parse()
                    .map_err(|_| CommandError::Offset(offset.to_string()))?;
                let mask = mask.map_or(Ok(0x01), parse_mask)?;
                if command == "flip" {
                    Fault::FlipByte { offset, mask }
                } else {
                    Fault::Rewrite { offset, mask }
                }
            }
            other => return Err(CommandError::Unknown(other.to_string())),
        };
        Ok(Command::Inject {
            direction: direction.unwrap_or(Direction::Both),
            fault,
            only,
        })
    }

    /// Runs the command on `relay`; the answer line (without its newline).
    pub fn run(&self, relay: &RelayHandle) -> Result<String, RelayError> {
        match *self {
            Command::Inject {
                direction,
                fault,
                only,
            } => {
                relay.inject_matching(direction, fault, only)?;
                Ok(match only {
                    Some(k) => format!(
                        "ok {direction} {fault} on {}",
                        crate::fault::frame_kind_name(k.code())
                    ),
                    None => format!("ok {direction} {fault}"),
                })
            }
            Command::Counters => Ok(format!("ok {}", relay.counters())),
            Command::Clear => {
                relay.clear();
                Ok("ok cleared".into())
            }
        }
    }
}

fn no_args(args: &[&str]) -> Result<(), CommandError> {
    if args.is_empty() {
        Ok(())
    } else {
        Err(CommandError::Extra(args.join(" ")))
    }
}

fn parse_mask(word: &str) -> Result<u8, CommandError> {
    let parsed = match word.strip_prefix("0x") {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => word.parse(),
    };
    parsed
        .ok()
        .filter(|&m| m != 0)
        .ok_or_else(|| CommandError::Mask(word.to_string()))
}

/// `50ms`, `2s`, `200us`, or a bare number of milliseconds.
pub fn parse_duration(word: &str) -> Result<Duration, CommandError> {
    let bad = || CommandError::Duration(word.to_string());
    let split = word
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(word.len());
    let (number, unit) = word.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    match unit {
        "" | "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "us" => Ok(Duration::from_micros(n)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::kind;

    fn inject(direction: Direction, fault: Fault, only: Option<FrameKind>) -> Command {
        Command::Inject {
            direction,
            fault,
            only,
        }
    }

    #[test]
    fn the_documented_commands_parse() {
        use Direction::*;
        let cases = [
            ("up drop", inject(Up, Fault::Drop, None)),
            (
                "down flip 12",
                inject(
                    Down,
                    Fault::FlipByte {
                        offset: 12,
                        mask: 1,
                    },
                    None,
                ),
            ),
            (
                "up flip 27 0x80 on Pages",
                inject(
                    Up,
                    Fault::FlipByte {
                        offset: 27,
                        mask: 0x80,
                    },
                    Some(kind::PAGES),
                ),
            ),
            (
                "down rewrite 40 on Sealed",
                inject(
                    Down,
                    Fault::Rewrite {
                        offset: 40,
                        mask: 1,
                    },
                    Some(kind::SEALED),
                ),
            ),
            (
                "up delay 50ms",
                inject(Up, Fault::Delay(Duration::from_millis(50)), None),
            ),
            ("both stall", inject(Both, Fault::Stall, None)),
            ("resume", inject(Both, Fault::Resume, None)),
            ("reset", inject(Both, Fault::Reset, None)),
            (
                "up reset after EpochEnd",
                inject(Up, Fault::Reset, Some(kind::EPOCH_END)),
            ),
            ("fin up", inject(Up, Fault::Fin, None)),
            (
                "up drop on epoch-end",
                inject(Up, Fault::Drop, Some(kind::EPOCH_END)),
            ),
            (
                "down dup on 72",
                inject(Down, Fault::Duplicate, Some(kind::ACK)),
            ),
            ("up reorder", inject(Up, Fault::Reorder, None)),
            ("counters", Command::Counters),
            ("  clear ", Command::Clear),
        ];
        for (line, expected) in cases {
            assert_eq!(Command::parse(line), Ok(expected), "{line}");
        }
    }

    #[test]
    fn bad_commands_say_what_is_wrong() {
        let cases = [
            ("", CommandError::Empty),
            ("up", CommandError::Empty),
            ("up explode", CommandError::Unknown("explode".into())),
            ("up down drop", CommandError::TwoDirections),
            (
                "up drop on",
                CommandError::Missing {
                    command: "on/after",
                    what: "a frame kind",
                },
            ),
            ("up drop on Nothing", CommandError::Kind("Nothing".into())),
            ("up drop now", CommandError::Extra("now".into())),
            ("up flip x", CommandError::Offset("x".into())),
            ("up flip 3 0", CommandError::Mask("0".into())),
            ("up delay 5m", CommandError::Duration("5m".into())),
            ("up counters", CommandError::Plain("counters")),
        ];
        for (line, expected) in cases {
            assert_eq!(Command::parse(line), Err(expected), "{line:?}");
        }
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("200us"), Ok(Duration::from_micros(200)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }
}
