use std::process::ExitCode;

fn main() -> ExitCode {
    lamina_compiler::cli::main()
}
