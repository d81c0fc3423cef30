//! `ftctl user list|set|delete`: the web console's users. A password is
//! asked on the terminal without echo (twice), or read from standard input
//! with `--password-stdin` (for scripts).

use std::io::{BufRead, IsTerminal};

use clap::Subcommand;
use serde_json::Value;

use ftd_client::client::ApiClient;

use crate::api_commands::{emit, print_json, CommandError};

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// List the console's users.
    List,
    /// Make a console user, or give one a new password (10 characters at
    /// least); both nodes learn it.
    Set {
        name: String,
        /// Read the password from standard input's first line instead of
        /// asking on the terminal.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete a console user (their console sessions end).
    Delete { name: String },
}

pub fn run(client: &ApiClient, json: bool, command: UserCommand) -> Result<(), CommandError> {
    match command {
        UserCommand::List => {
            let users: Value = client.users()?;
            if json {
                return print_json(&users);
            }
            let names: Vec<&str> = users
                .as_array()
                .map(|a| a.iter().filter_map(|u| u["name"].as_str()).collect())
                .unwrap_or_default();
            emit(&if names.is_empty() {
                "no console users (the API token logs in as admin)\n".to_string()
            } else {
                names.iter().map(|n| format!("{n}\n")).collect()
            })
        }
        UserCommand::Set {
            name,
            password_stdin,
        } => {
            let password = read_password(password_stdin)?;
            let user: Value = client.set_user(&name, &password)?;
            if json {
                return print_json(&user);
            }
            emit(&format!("console user {name} set\n"))
        }
        UserCommand::Delete { name } => {
            client.delete_user(&name)?;
            emit(&format!("console user {name} deleted\n"))
        }
    }
}

fn read_password(from_stdin: bool) -> Result<String, CommandError> {
    if from_stdin || !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(CommandError::Password)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    let first = rpassword::prompt_password("password: ").map_err(CommandError::Password)?;
    let again = rpassword::prompt_password("again: ").map_err(CommandError::Password)?;
    if first != again {
        return Err(CommandError::PasswordsDiffer);
    }
    Ok(first)
}
