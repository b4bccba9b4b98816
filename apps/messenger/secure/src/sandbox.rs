//! The seccomp filter Secure runs under: any socket that is not `AF_UNIX` fails with `EPERM`,
//! and so does `io_uring_setup` (io_uring would let a process do I/O the filter never sees).
//! Everything else is allowed, so a compromised Secure can still read its own files but can
//! reach no network: its only peers are the UI and Network, over Unix sockets.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the seccomp filter: {0}")]
pub struct SandboxError(String);

fn not_unix() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let cond = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?;
    Ok(vec![SeccompRule::new(vec![cond])?])
}

/// Installs the filter on every thread of the process (TSYNC), so threads started earlier
/// by libraries are covered too.
pub fn install() -> Result<(), SandboxError> {
    let err = |e: &dyn std::fmt::Display| SandboxError(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_socket, not_unix().map_err(|e| err(&e))?);
    rules.insert(libc::SYS_socketpair, not_unix().map_err(|e| err(&e))?);
    // An empty rule list matches the syscall unconditionally.
    rules.insert(libc::SYS_io_uring_setup, vec![]);
    let arch = std::env::consts::ARCH.try_into().map_err(|e: seccompiler::BackendError| err(&e))?;
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch).map_err(|e| err(&e))?;
    let program: BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| err(&e))?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| err(&e))
}

/// Tries to open an `AF_INET` socket, as any code in this process would, and returns the
/// errno (0 if it worked, which means there is no sandbox) and its text.
pub fn check() -> (i32, String) {
    match std::net::UdpSocket::bind("127.0.0.1:0") {
        Ok(_) => (0, "an AF_INET socket was opened".into()),
        Err(e) => (e.raw_os_error().unwrap_or(-1), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_filter_blocks_inet_sockets_and_keeps_unix_ones() {
        // Run in a child thread's process? seccomp is per process once TSYNC'd, so do it in a
        // forked child to keep the test harness unfiltered.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "sandbox::tests::child", "--nocapture", "--ignored"])
            .env("CANOPY_SANDBOX_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("CHILD-OK"), "{text}");
    }

    #[test]
    #[ignore = "run by the_filter_blocks_inet_sockets_and_keeps_unix_ones in a child process"]
    fn child() {
        if std::env::var_os("CANOPY_SANDBOX_CHILD").is_none() {
            return;
        }
        assert_eq!(super::check().0, 0, "no sandbox yet");
        super::install().unwrap();
        let (errno, _) = super::check();
        assert_eq!(errno, libc::EPERM);
        assert!(std::net::TcpStream::connect("127.0.0.1:9").unwrap_err().raw_os_error() == Some(libc::EPERM));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(a);
        // Threads spawned after install are covered too.
        let errno = std::thread::spawn(|| super::check().0).join().unwrap();
        assert_eq!(errno, libc::EPERM);
        println!("CHILD-OK");
    }
}
