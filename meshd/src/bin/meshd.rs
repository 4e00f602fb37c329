//! `meshd`: Weft's node agent, and its userspace data plane.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use weft_meshd::{agent, cni, dataplane, uninstall};

#[derive(Parser)]
#[command(
    version,
    about = "Weft's node agent: a WireGuard mesh between Kubernetes nodes"
)]
struct Cli {
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run(Box<agent::RunArgs>),
    /// Run the userspace WireGuard device IFACE, serving its UAPI socket
    /// until SIGTERM; it outlives meshd. Where the mode resolves to kernel
    /// WireGuard it runs nothing and waits for SIGTERM.
    Dataplane {
        /// As meshd's --dataplane.
        #[arg(long, env = dataplane::MODE_ENV, value_enum, default_value = "auto")]
        mode: dataplane::Mode,
        /// `off`: no TUN or UDP offloads (the paths every missing kernel
        /// feature falls back to).
        #[arg(long, value_enum, default_value = "auto")]
        offloads: weft_dataplane::Offloads,
        #[arg(env = dataplane::INTERFACE_ENV, default_value = dataplane::DEFAULT_INTERFACE)]
        iface: String,
    },
    /// Install the `weft` CNI plugin and its conflist and let the node
    /// forward (the DaemonSet's init container).
    InstallCni(cni::InstallArgs),
    /// Remove everything Weft made on this node (after Weft is deleted:
    /// the cleanup DaemonSet in deploy/uninstall runs it).
    Uninstall(uninstall::UninstallArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("MESHD_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let result = match cli.command {
        Cmd::Dataplane {
            mode,
            offloads,
            iface,
        } => dataplane::serve(&iface, mode, offloads),
        Cmd::InstallCni(args) => cni::install(&args).and_then(|ranges| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(cni::enable_forwarding(&ranges))
        }),
        Cmd::Uninstall(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(uninstall::run(&args))),
        Cmd::Run(args) => {
            // meshd supervises the userspace data plane itself; wireguard-control
            // must never start one on its own when a socket is missing.
            std::env::set_var("WG_USERSPACE_IMPLEMENTATION", "/bin/false");
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(agent::run(*args)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("meshd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
