//! A hostile client: speaks dsg's framed protocol to the real `dsg agent`
//! on its stdin/stdout, exactly as a client at the other end of an SSH
//! connection could, and sends whatever it likes. Every read has a time
//! limit: an agent that stops answering fails the test instead of hanging
//! it.

#![allow(dead_code)]

use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[allow(unused_imports)]
pub use dsg_repo::protocol::{
    read_json, write_data, write_frame, write_json, ErrorKind, Request, Response, PROTOCOL_VERSION,
};

pub struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: mpsc::Receiver<Reply>,
}

/// One reply frame as read off the agent's stdout: a JSON answer, or the
/// bytes of a data stream that followed one.
#[derive(Debug)]
pub enum Reply {
    Json(Response),
    Data(Vec<u8>),
    /// The agent closed its output (it exited).
    Closed,
}

impl Agent {
    /// `dsg agent --repo REPO --type xfs`, with `envs` added.
    pub fn spawn(dsg: &Path, repo: &Path, envs: &[(&str, &str)]) -> Agent {
        let mut child = Command::new(dsg)
            .args(["agent", "--repo"])
            .arg(repo)
            .args(["--type", "xfs"])
            .envs(envs.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dsg agent");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || read_replies(stdout, tx));
        Agent {
            child,
            stdin,
            replies,
        }
    }

    pub fn send(&mut self, req: &Request) {
        let w = self.stdin.as_mut().expect("stdin open");
        write_json(w, req).expect("send request");
        w.flush().expect("flush");
    }

    /// A data stream (`D` frames, then `E`).
    pub fn data(&mut self, bytes: &[u8]) {
        let w = self.stdin.as_mut().expect("stdin open");
        write_data(w, bytes).expect("send data");
        w.flush().expect("flush");
    }

    /// Raw bytes, framed or not.
    pub fn raw(&mut self, bytes: &[u8]) {
        let w = self.stdin.as_mut().expect("stdin open");
        w.write_all(bytes).expect("send raw");
        w.flush().expect("flush");
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes the agent's input (the client went away).
    pub fn close_input(&mut self) {
        self.stdin = None;
    }

    /// The next reply within `secs` seconds; panics (naming `what`) if the
    /// agent does not answer in time.
    pub fn recv(&mut self, what: &str, secs: u64) -> Reply {
        match self.replies.recv_timeout(Duration::from_secs(secs)) {
            Ok(r) => r,
            Err(_) => {
                let _ = self.child.kill();
                panic!("{what}: the agent did not answer within {secs} s");
            }
        }
    }

    /// The next JSON reply within `secs` seconds.
    pub fn recv_json(&mut self, what: &str, secs: u64) -> Response {
        match self.recv(what, secs) {
            Reply::Json(r) => r,
            other => panic!("{what}: expected a JSON reply, got {other:?}"),
        }
    }

    /// `Hello` with the right protocol version; returns the answer.
    pub fn hello(&mut self) -> Response {
        self.send(&Request::Hello {
            protocol: PROTOCOL_VERSION,
            client_version: "hostile".into(),
        });
        self.recv_json("hello", 10)
    }

    /// Waits for the agent to exit (after `close_input`), within `secs`.
    pub fn wait(mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the agent did not exit within {secs} s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_replies(stdout: ChildStdout, tx: mpsc::Sender<Reply>) {
    let mut r = BufReader::new(stdout);
    loop {
        let mut head = [0u8; 5];
        if r.read_exact(&mut head).is_err() {
            let _ = tx.send(Reply::Closed);
            return;
        }
        let len = u32::from_le_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            let _ = tx.send(Reply::Closed);
            return;
        }
        let reply = match head[0] {
            b'J' => match serde_json::from_slice(&body) {
                Ok(resp) => Reply::Json(resp),
                Err(_) => Reply::Closed,
            },
            b'D' => {
                // Gather the whole stream up to its `E` frame.
                let mut data = body;
                loop {
                    let mut h = [0u8; 5];
                    if r.read_exact(&mut h).is_err() {
                        let _ = tx.send(Reply::Closed);
                        return;
                    }
                    let n = u32::from_le_bytes(h[1..5].try_into().unwrap()) as usize;
                    let mut b = vec![0u8; n];
                    if r.read_exact(&mut b).is_err() {
                        let _ = tx.send(Reply::Closed);
                        return;
                    }
                    if h[0] == b'E' {
                        break;
                    }
                    data.extend_from_slice(&b);
                }
                Reply::Data(data)
            }
            b'E' => Reply::Data(Vec::new()),
            _ => Reply::Closed,
        };
        if tx.send(reply).is_err() {
            return;
        }
    }
}
