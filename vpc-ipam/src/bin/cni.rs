//! `vpc-ipam`: the CNI IPAM plugin. The runtime (or the main plugin) runs it
//! with CNI_* variables and the network configuration on stdin; it prints
//! a result or a CNI error object on stdout.

use std::io::{Read, Write};
use std::process::ExitCode;

use cnlb_vpc_ipam::cni::{self, ErrorCode, Invocation};
use cnlb_vpc_ipam::plugin;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Err(err) => Err(cni::Error::new(
            ErrorCode::IoFailure,
            "cannot read stdin",
            err.to_string(),
        )),
        Ok(_) => Invocation::from_env()
            // Environment errors come first; answer in the caller's version
            // when stdin tells it.
            .map_err(|e| match cni::peek_version(&stdin) {
                Some(version) => e.with_version(version),
                None => e,
            })
            .and_then(|invocation| plugin::run(&invocation, &stdin)),
    };
    match outcome {
        Ok(success) => {
            if let Some(note) = success.note {
                eprintln!("{note}");
            }
            match success.stdout {
                Some(text) => print_line(&text),
                None => ExitCode::SUCCESS,
            }
        }
        Err(error) => {
            // The spec: errors go to stdout as a CNI error object, with a
            // non-zero exit status.
            print_line(&error.to_json());
            ExitCode::FAILURE
        }
    }
}

fn print_line(text: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vpc-ipam: cannot write to stdout: {err}");
            ExitCode::FAILURE
        }
    }
}
