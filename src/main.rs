use std::process::ExitCode;

fn main() -> ExitCode {
    sensorgate::cli::main()
}
