//! The ceiling server: answers 200 at once and persists nothing, in a
//! process of its own like the relay.

use super::*;

/// The ceiling server as a process of its own, like the relay (same tokio
/// defaults: one worker thread per core), so the two are measured alike. It
/// prints its address and serves until its stdin closes.
pub(crate) fn ceiling_server_process() -> AnyResult<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let addr = ceiling_server().await?;
        println!("{addr}");
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await??;
        Ok(())
    })
}

/// Starts [`ceiling_server_process`]; it exits when the returned child is
/// dropped (its stdin closes) or killed.
pub(crate) fn spawn_ceiling_server() -> AnyResult<(Child, SocketAddr)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--bench", "--ceiling-server"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line)?;
    let addr = line.trim().parse()?;
    Ok((child, addr))
}

pub(crate) async fn ceiling_server() -> AnyResult<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"{\"id\":\"x\"}"))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(addr)
}
