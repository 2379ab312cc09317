#!/usr/bin/env bash
# Install what the Vulkan backend needs to build and run on Debian 12, from Debian's
# packages only, and print the CMake arguments that point at it.
#
# Debian 12's Vulkan headers (1.3.239) are too old for the pinned ggml-vulkan, so the
# headers come from Debian 13's libvulkan-dev and spirv-headers, unpacked into a private
# prefix (not installed: Debian 13's glslc would need a newer libc). The loader, glslc,
# glslang and Mesa's software driver (llvmpipe) are Debian 12's own.
# Usage: eval "CMAKE_ARGS=\"$(tools/vulkan_deps.sh)\""
set -euo pipefail
prefix="${PYLLAMA_MTP_CACHE:-$HOME/.cache/pyllama_mtp}/vulkan-headers"
quiet() { "$@" >/dev/null 2>&1; }

missing=()
for pkg in libvulkan-dev glslc glslang-tools mesa-vulkan-drivers spirv-headers; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    quiet apt-get update
    DEBIAN_FRONTEND=noninteractive quiet apt-get install -y --no-install-recommends "${missing[@]}"
fi

if [ ! -f "$prefix/usr/include/vulkan/vulkan.hpp" ] || ! grep -q LayerSettingEXT -r "$prefix/usr/include/vulkan" 2>/dev/null; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    # A private apt configuration that also sees Debian 13 ("trixie"), derived from this
    # machine's own sources so no mirror is named here; the system's apt is untouched.
    mkdir -p "$work/etc/sources.list.d" "$work/lists/partial" "$work/cache/archives/partial"
    sed -E 's/^Suites:.*/Suites: trixie/' /etc/apt/sources.list.d/debian.sources \
        | awk 'BEGIN{RS=""; ORS="\n\n"} /Suites: trixie/ && !seen++' > "$work/etc/sources.list.d/trixie.sources"
    opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/etc/sources.list.d"
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Get::List-Cleanup=0"
          -o "Debug::NoLocking=1")
    quiet apt-get "${opts[@]}" update
    (cd "$work" && quiet apt-get "${opts[@]}" download libvulkan-dev/trixie spirv-headers/trixie)
    rm -rf "$prefix" && mkdir -p "$prefix"
    for deb in "$work"/*.deb; do dpkg -x "$deb" "$prefix"; done
fi
echo "-DVulkan_INCLUDE_DIR=$prefix/usr/include -DCMAKE_PREFIX_PATH=$prefix/usr"
