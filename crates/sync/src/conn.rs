//! Transport: any byte stream split into a reading and a writing half.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;

/// A replication connection over any byte stream.
///
/// Build one from a TCP stream ([`Conn::tcp`], which sets `TCP_NODELAY`), a
/// unix socket ([`Conn::unix`]) or any reading and writing halves
/// ([`Conn::from_halves`], e.g. a serial port opened twice). The closer, if
/// given, unblocks a reader stuck in `read` when the link is torn down.
pub struct Conn {
    pub(crate) reader: Box<dyn Read + Send>,
    pub(crate) writer: Box<dyn Write + Send>,
    pub(crate) closer: Option<Arc<dyn Fn() + Send + Sync>>,
    pub(crate) peer: String,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn").field("peer", &self.peer).finish()
    }
}

impl Conn {
    /// A connection over a TCP stream; sets `TCP_NODELAY`.
    pub fn tcp(stream: TcpStream) -> io::Result<Conn> {
        stream.set_nodelay(true)?;
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "tcp".into());
        let reader = stream.try_clone()?;
        let closer_stream = stream.try_clone()?;
        Ok(Conn {
            reader: Box::new(reader),
            writer: Box::new(stream),
            closer: Some(Arc::new(move || {
                let _ = closer_stream.shutdown(Shutdown::Both);
            })),
            peer,
        })
    }

    /// A connection over a unix stream socket.
    #[cfg(unix)]
    pub fn unix(stream: std::os::unix::net::UnixStream) -> io::Result<Conn> {
        let reader = stream.try_clone()?;
        let closer_stream = stream.try_clone()?;
        Ok(Conn {
            reader: Box::new(reader),
            writer: Box::new(stream),
            closer: Some(Arc::new(move || {
                let _ = closer_stream.shutdown(Shutdown::Both);
            })),
            peer: "unix".into(),
        })
    }

    /// A connection over separate reading and writing halves of any byte
    /// stream. `closer`, if given, is called to tear the link down (it should
    /// make a blocked `read` return).
    pub fn from_halves(
        reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
        closer: Option<Box<dyn Fn() + Send + Sync>>,
        peer: impl Into<String>,
    ) -> Conn {
        Conn {
            reader: Box::new(reader),
            writer: Box::new(writer),
            closer: closer.map(Arc::from),
            peer: peer.into(),
        }
    }

    /// A description of the peer.
    pub fn peer(&self) -> &str {
        &self.peer
    }
}
